"""The group commit on PostgreSQL, run in the writer's thread: one transaction for many deliveries.

The same input and outcomes as storage.writes.write_batch (SQLite), and the same semantics, made safe for
several replicas writing one database at once:

- The first statement locks the batch's conversations in id order (``LOCK_CONVERSATIONS``): the one lock
  order of every writer. A batch that still hits a deadlock or serialization failure (40P01, 40001) is
  rolled back and written again whole, a few times, before it fails as a storage fault.
- A delivery is stored once because its key is claimed by the insert itself (``ON CONFLICT (delivery_key)
  DO NOTHING RETURNING``), never looked up first: a key another replica holds uncommitted makes this one
  wait, then skip it.
- Counts come from ``RETURNING``, so a re-delivery needs no second pass.
- Text PostgreSQL cannot store (U+0000, which psycopg refuses client side, and lone surrogates, which are
  not UTF-8) is refused per delivery before the batch starts: that delivery is answered with
  ``StorageRejected`` and kept, raw body intact, in ``dead_letters``; the rest of the batch commits.
- Only a refusal by the server itself (a value out of range, a constraint) takes the slow path: the batch
  is written again one delivery per savepoint, in transactions of at most ``MAX_SAVEPOINTS`` deliveries
  (more subtransactions than that in one transaction slow every snapshot on the server).
- A connection lost during COMMIT leaves the outcome unknown: ``StorageUnavailable``, which the daemon
  answers 503 (the sender retries, and the retry is deduplicated by its key).
- The transaction records what it changed, one change per conversation, in ``changes``, last thing
  before COMMIT, with positions made visible in commit order (storage.postgres.outbox).
- A conversation erased while the batch waited for its row lock is dropped like any erased one: the
  tombstones are read again, under the lock, for the conversations the batch created
  (storage.postgres.erasure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from storage.deliveries import (
    CHANGED_MESSAGE_COLUMNS,
    VENDOR_MESSAGE_COLUMNS,
    VENDOR_ROLE,
    VENDOR_ROW_WIDTH,
    AppendRow,
    Record,
    WriteResult,
    message_counts,
)
from storage.errors import StorageRejected, StorageUnavailable
from storage.postgres import erasure
from storage.postgres import statements as sql
from storage.postgres.connection import Connection
from storage.postgres.outbox import ChangeSet
from storage.postgres.retries import ATTEMPTS, RETRIED, pause
from storage.postgres.statements import FLOAT_PATCH_COLUMNS
from storage.statements import PATCH_COLUMNS

log = logging.getLogger("transcriptd.storage")

Outcome = WriteResult | StorageRejected

# Subtransactions per transaction on the slow path (PostgreSQL keeps 64 per backend in shared memory;
# past that every snapshot looks further).
MAX_SAVEPOINTS = 64
# What the server raises when it refuses a delivery's rows; anything else (a lost connection, a full disk,
# a read-only server) is a fault of the storage and fails the whole batch.
REFUSALS = (psycopg.DataError, psycopg.IntegrityError)


def write_batch(conn: Connection, batch: Sequence[Record]) -> list[Outcome]:
    """Write ``batch`` in one transaction, with its changes, and commit; one outcome per delivery, in order
    (see ``commit_batch``)."""
    outcomes, _ = commit_batch(conn, batch)
    return outcomes


def commit_batch(
    conn: Connection, batch: Sequence[Record], *, record_changes: bool = True
) -> tuple[list[Outcome], int | None]:
    """Write ``batch`` in one transaction, with its changes (storage.postgres.outbox), and commit: one
    outcome per delivery, in order, and the position of the last change recorded (None: nothing changed).

    ``conn`` is in autocommit mode with no transaction open. A fault of the storage raises
    ``StorageUnavailable`` and nothing of the batch is stored, except that after a lost COMMIT the batch
    may or may not be.
    """
    refused = {i: reason for i, delivery in enumerate(batch) if (reason := unstorable(delivery)) is not None}
    for attempt in range(1, ATTEMPTS + 1):
        try:
            try:
                return _write_in_one_transaction(conn, batch, refused, record_changes)
            except REFUSALS as exc:
                log.warning("the database refused part of a batch, writing it one delivery at a time: %s", exc)
                return _write_isolated(conn, batch, refused, record_changes)
        except RETRIED as exc:
            if attempt == ATTEMPTS:
                raise StorageUnavailable(f"storage is unavailable: {exc.__class__.__name__} {ATTEMPTS} times") from exc
            log.info("batch retried whole after %s (attempt %d)", exc.__class__.__name__, attempt)
            pause(attempt)
    raise AssertionError("unreachable")


def unstorable(delivery: Record) -> str | None:
    """Why PostgreSQL would refuse ``delivery``'s text, or None: checked before the batch, so one such
    delivery never aborts the transaction of the others. All its text is joined and checked at once (a
    check per string was a tenth of the writer's time on 100-message transcripts)."""
    patch = delivery.patch
    texts = [delivery.key, delivery.source, delivery.event_type, delivery.conversation_id, delivery.metadata or ""]
    texts += [value for column in PATCH_COLUMNS if (value := getattr(patch, column)).__class__ is str]
    texts += [value for row in delivery.rows for value in row if value.__class__ is str]
    texts += [value for row in delivery.append_rows for value in row if value.__class__ is str]
    joined = "".join(texts)
    if "\x00" in joined:
        return "text holds U+0000 (NUL), which PostgreSQL's text type cannot store"
    if not joined.isascii():
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError:
            return "text holds a lone surrogate (U+D800..U+DFFF), which is not valid UTF-8"
    return None


def _write_in_one_transaction(
    conn: Connection, batch: Sequence[Record], refused: dict[int, str], record_changes: bool
) -> tuple[list[Outcome], int | None]:
    with _transaction(conn):
        for i, reason in refused.items():
            _dead_letter(conn, batch[i], reason)
        accepted = [delivery for i, delivery in enumerate(batch) if i not in refused]
        changes = ChangeSet(enabled=record_changes)
        results = iter(write_deliveries(conn, accepted, changes))
        position = changes.record(conn)
    outcomes = [_rejected(batch[i], refused[i]) if i in refused else next(results) for i in range(len(batch))]
    return outcomes, position


def _write_isolated(
    conn: Connection, batch: Sequence[Record], refused: dict[int, str], record_changes: bool
) -> tuple[list[Outcome], int | None]:
    """The slow path: each delivery in a savepoint of its own, at most ``MAX_SAVEPOINTS`` per transaction.
    A delivery the server refuses is rolled back alone and dead-lettered in its savepoint.

    A batch of more than ``MAX_SAVEPOINTS`` deliveries commits in several transactions; if a later one
    fails (a fault, or a deadlock and the batch's retry), the deliveries of the committed ones are answered
    as failed, or as duplicates on the retry, though stored: their senders' retries are deduplicated.
    Each transaction records its own changes; the position returned is the last one recorded."""
    outcomes: list[Outcome] = []
    position: int | None = None
    for start in range(0, len(batch), MAX_SAVEPOINTS):
        chunk: list[Outcome] = []
        changes = ChangeSet(enabled=record_changes)
        with _transaction(conn):
            for i in range(start, min(start + MAX_SAVEPOINTS, len(batch))):
                delivery = batch[i]
                conn.execute("SAVEPOINT delivery")
                if i in refused:
                    chunk.append(_rejected(delivery, refused[i]))
                    _dead_letter(conn, delivery, refused[i])
                    conn.execute("RELEASE delivery")
                    continue
                tracked = changes.tracked()
                try:
                    chunk.extend(write_deliveries(conn, [delivery], changes))
                except REFUSALS as exc:
                    conn.execute("ROLLBACK TO delivery")
                    changes.forget_since(tracked)
                    error = f"{exc.__class__.__name__}: {exc}"
                    log.error("delivery rejected by the database: %s", error)
                    chunk.append(StorageRejected(f"the database rejected this delivery: {exc}"))
                    _dead_letter(conn, delivery, error)
                conn.execute("RELEASE delivery")
            recorded = changes.record(conn)
        outcomes.extend(chunk)
        position = recorded if recorded is not None else position
    return outcomes, position


class _transaction:
    """BEGIN ... COMMIT on an autocommit connection, with the storage's failures translated: anything lost
    with the connection is ``StorageUnavailable``, and a lost COMMIT says its outcome is unknown."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        try:
            self.conn.execute("BEGIN")
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"storage is unavailable: {exc}") from exc

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None:
            self._rollback()
            if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, RETRIED):
                raise StorageUnavailable(f"storage is unavailable, nothing of the batch was stored: {exc}") from exc
            return
        try:
            self.conn.execute("COMMIT")
        except RETRIED:
            raise  # rolled back by the server: certain, and worth a retry
        except psycopg.Error as exc:
            self._rollback()
            raise StorageUnavailable(f"the commit's outcome is unknown (the batch may be stored): {exc}") from exc

    def _rollback(self) -> None:
        if self.conn.closed or self.conn.broken:
            return
        try:
            self.conn.execute("ROLLBACK")
        except psycopg.OperationalError:
            log.warning("rollback failed: the connection is gone, and the server rolls back on its own")


def _rejected(delivery: Record, reason: str) -> StorageRejected:
    log.error("delivery %s refused before the batch: %s", _storable(delivery.key), reason)
    return StorageRejected(f"the database rejected this delivery: {reason}")


def _dead_letter(conn: Connection, delivery: Record, error: str) -> None:
    """Keep a refused delivery, its raw body as received, in ``dead_letters`` inside the open transaction;
    its text columns made storable (the very reason for the refusal may be in its key or conversation id)."""
    texts = (delivery.key, delivery.source, delivery.event_type, delivery.conversation_id)
    row = (*map(_storable, texts), delivery.received_at, delivery.body, _storable(error), time.time())
    conn.execute(sql.DEAD_LETTER, row)


def _storable(text: str) -> str:
    """``text`` as PostgreSQL can hold it: U+0000 and lone surrogates written as escapes."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _null(value: Any) -> Any:
    """Rows built for SQLite's bulk binds hold NULL as NaN (storage.deliveries.NULL); PostgreSQL keeps NaN
    as a real float value, so it is None here."""
    return None if value != value else value  # NaN is the one value unequal to itself


def _real(value: float | None) -> float | None:
    return None if value is None else float(value)


def write_deliveries(
    conn: Connection, batch: Sequence[Record], changes: ChangeSet | None = None, *, store_events: bool = True
) -> list[WriteResult]:
    """Store every delivery not seen before, inside the open transaction; one result per delivery. A
    delivery seen before (its key stored, by any replica, or earlier in this batch) changes nothing; one
    whose conversation was erased stores nothing, and is counted on its tombstone.

    What the fresh deliveries change is noted in ``changes`` (tracked under the conversations' row locks;
    messages noted only once every statement succeeded), for the caller to record before its COMMIT.

    ``store_events=False`` (replay): the events are the ones already stored, re-parsed; they are not
    claimed again, only their conversations and messages are written (idempotently)."""
    if not batch:
        return []
    live, created = _lock_conversations(conn, batch)
    erased = [d for d in batch if d.conversation_id not in live]
    if erased:
        _count_dropped(conn, erased)
    kept = [d for d in batch if d.conversation_id in live]
    fresh = _claim(conn, kept) if store_events else _first_of_each_key(kept)
    fresh_cids = {d.conversation_id for d in fresh}
    if created - fresh_cids:
        conn.execute(sql.DROP_UNUSED_CONVERSATIONS, (sorted(created - fresh_cids),))
    if changes is not None:
        changes.track(conn, [d.conversation_id for d in fresh], created)
    _patch_conversations(conn, fresh)
    tally = {id(d): _Tally() for d in fresh}
    _write_transcripts(conn, fresh, tally)
    _write_appends(conn, fresh, tally)
    _count_messages(conn, fresh, tally)
    if changes is not None:
        for delivery in fresh:
            noted = tally[id(delivery)]
            changes.messages(delivery.conversation_id, noted.inserted, noted.updated, noted.seqs)

    results = []
    for delivery in batch:
        if delivery.conversation_id not in live:
            results.append(WriteResult(delivery.received, 0, 0, delivery.rejected, erased=True))
        elif (counted := tally.get(id(delivery))) is None:
            results.append(WriteResult(delivery.received, 0, 0, delivery.rejected, duplicate_delivery=True))
        else:
            results.append(WriteResult(delivery.received, counted.inserted, counted.updated, delivery.rejected))
    return results


@dataclass(slots=True)
class _Tally:
    inserted: int = 0
    updated: int = 0
    seqs: list[int] = field(default_factory=list)  # of the messages inserted or updated, for the change


def _lock_conversations(conn: Connection, batch: Sequence[Record]) -> tuple[set[str], set[str]]:
    """Insert or lock the batch's conversations in id order; (the ones not erased, the ones inserted)."""
    first: dict[str, Record] = {}
    for delivery in batch:
        first.setdefault(delivery.conversation_id, delivery)
    ids = sorted(first)
    rows = conn.execute(
        sql.LOCK_CONVERSATIONS,
        (ids, [first[cid].source for cid in ids], [float(first[cid].received_at) for cid in ids]),
    ).fetchall()
    live, created = {row[0] for row in rows}, {row[0] for row in rows if row[1]}
    # An erasure that held the row when this upsert ran deleted it and committed its tombstone: the upsert
    # then inserted the row again (the tombstone check above was read before that commit). Checked again
    # here, under the lock, where that commit is visible (storage.postgres.erasure).
    if created and (late := erasure.tombstoned(conn, created)):
        conn.execute(sql.DROP_UNUSED_CONVERSATIONS, (sorted(late),))
        live -= late
        created -= late
    return live, created


def _count_dropped(conn: Connection, dropped: Sequence[Record]) -> None:
    per_conversation: dict[str, int] = {}
    for delivery in dropped:
        per_conversation[delivery.conversation_id] = per_conversation.get(delivery.conversation_id, 0) + 1
    erasure.count_dropped(conn, per_conversation, time.time())


def _claim(conn: Connection, batch: Sequence[Record]) -> list[Record]:
    """Insert the deliveries' events; the fresh deliveries, in batch order: the first of the batch with
    each key this statement stored."""
    if not batch:
        return []
    cursor = conn.execute(
        sql.CLAIM_EVENTS,
        (
            [d.key for d in batch],
            [d.source for d in batch],
            [d.event_type for d in batch],
            [d.conversation_id for d in batch],
            [float(d.received_at) for d in batch],
            [d.body for d in batch],
            [d.problems for d in batch],
        ),
    )
    claimed = {row[0] for row in cursor.fetchall()}
    fresh = []
    for delivery in batch:
        if delivery.key in claimed:
            claimed.discard(delivery.key)
            fresh.append(delivery)
    return fresh


def _first_of_each_key(batch: Sequence[Record]) -> list[Record]:
    seen: set[str] = set()
    first = []
    for delivery in batch:
        if delivery.key not in seen:
            seen.add(delivery.key)
            first.append(delivery)
    return first


@dataclass(slots=True)
class _Patch:
    """One conversation's changes from a batch's fresh deliveries, in order."""

    status: str = "active"
    columns: dict[str, Any] = field(default_factory=dict)
    metadata: list[str] = field(default_factory=list)
    updated_at: float = float("-inf")


def _patch_conversations(conn: Connection, fresh: Sequence[Record]) -> None:
    patches: dict[str, _Patch] = {}
    for delivery in fresh:
        merged = patches.setdefault(delivery.conversation_id, _Patch())
        status = delivery.patch.status
        if status == "failed" or (status == "ended" and merged.status != "failed"):
            merged.status = status
        for column in PATCH_COLUMNS:
            value = getattr(delivery.patch, column)
            if value is not None:
                merged.columns[column] = value
        if delivery.metadata is not None:
            merged.metadata.append(delivery.metadata)
        merged.updated_at = max(merged.updated_at, delivery.received_at)
    if not patches:
        return
    ids = sorted(patches)
    ordered = [patches[cid] for cid in ids]
    params: list[list[Any]] = [ids, [p.status for p in ordered]]
    for column in PATCH_COLUMNS:
        values = [p.columns.get(column) for p in ordered]
        params.append([None if v is None else float(v) for v in values] if column in FLOAT_PATCH_COLUMNS else values)
    params.append([f"[{','.join(p.metadata)}]" if p.metadata else None for p in ordered])
    params.append([float(p.updated_at) for p in ordered])
    conn.execute(sql.PATCH_CONVERSATIONS, params)


MessageKey = tuple[str, str, int]
# Positions in a message row (storage.deliveries.VendorMessageRow; a plain row lacks VENDOR_ROLE). Binary
# arrays are typed by their elements, so reals go in as floats even where a parser kept an int.
NULLABLE_REALS = tuple(VENDOR_MESSAGE_COLUMNS.index(name) for name in ("timestamp", "seconds_from_start", "duration"))
NULLABLE_TEXTS = tuple(VENDOR_MESSAGE_COLUMNS.index(name) for name in ("inference_id", "vendor_role", "external_id"))
CREATED_AT = VENDOR_MESSAGE_COLUMNS.index("created_at")
CHANGED = len(CHANGED_MESSAGE_COLUMNS)  # the arrays UPDATE_CHANGED_MESSAGES takes: the first ones


def _write_transcripts(conn: Connection, fresh: Sequence[Record], tally: dict[int, _Tally]) -> None:
    """All transcript rows in one statement; a position already stored (or repeated in the batch) is
    rewritten if its entry changed, counted for the delivery that carried it."""
    owners: list[_Tally] = []
    columns: list[list[Any]] = [[] for _ in VENDOR_MESSAGE_COLUMNS]
    for delivery in fresh:
        if not delivery.rows:
            continue
        owners.extend([tally[id(delivery)]] * len(delivery.rows))
        transposed: list[Sequence[Any]] = list(zip(*delivery.rows, strict=True))
        if len(transposed) != VENDOR_ROW_WIDTH:
            transposed.insert(VENDOR_ROLE, [None] * len(delivery.rows))
        for column, values in zip(columns, transposed, strict=True):
            column.extend(values)
    for i in NULLABLE_REALS:
        columns[i] = [None if v is None or v != v else float(v) for v in columns[i]]
    for i in NULLABLE_TEXTS:
        columns[i] = [None if v != v else v for v in columns[i]]
    columns[CREATED_AT] = [float(v) for v in columns[CREATED_AT]]
    if not owners:
        return
    inserted: set[MessageKey] = {tuple(row) for row in conn.execute(sql.INSERT_MESSAGES, columns).fetchall()}
    # Each inserted position belongs to its first row in batch order; every other row is a re-delivery.
    again: list[int] = []
    for i, counted in enumerate(owners):
        key = (columns[0][i], columns[1][i], columns[2][i])
        if key in inserted:
            inserted.discard(key)
            counted.inserted += 1
            counted.seqs.append(key[2])
        else:
            again.append(i)
    # In rounds: a position repeated in the batch is compared with what the previous round left.
    while again:
        seen: set[MessageKey] = set()
        this_round: list[int] = []
        later: list[int] = []
        for i in again:
            key = (columns[0][i], columns[1][i], columns[2][i])
            (later if key in seen else this_round).append(i)
            seen.add(key)
        changed = conn.execute(
            sql.UPDATE_CHANGED_MESSAGES, [[column[i] for i in this_round] for column in columns[:CHANGED]]
        ).fetchall()
        changed_keys = {tuple(row) for row in changed}
        for i in this_round:
            if (columns[0][i], columns[1][i], columns[2][i]) in changed_keys:
                owners[i].updated += 1
                owners[i].seqs.append(columns[2][i])
        again = later


def _write_appends(conn: Connection, fresh: Sequence[Record], tally: dict[int, _Tally]) -> None:
    """The generic endpoint's messages, in order, each at its stream's next position (under the lock)."""
    rows = [(tally[id(delivery)], _append_params(row)) for delivery in fresh for row in delivery.append_rows]
    if not rows:
        return
    with conn.cursor() as cursor:
        cursor.executemany(sql.APPEND_MESSAGE, [params for _, params in rows], returning=True)
        skipped = []
        for counted, params in rows:
            if (appended := cursor.fetchone()) is not None:
                counted.inserted += 1
                counted.seqs.append(appended[0])
            elif params["external_id"] is not None:
                skipped.append((counted, params))
            cursor.nextset()
        for counted, params in skipped:
            changed = conn.execute(sql.UPDATE_CHANGED_BY_EXTERNAL_ID, params).fetchall()
            counted.updated += len(changed)
            counted.seqs.extend(row[0] for row in changed)


def _append_params(row: AppendRow) -> dict[str, Any]:
    cid, source, role, content, timestamp, external_id, created_at = row
    return {
        "cid": cid,
        "source": source,
        "role": role,
        "content": content,
        "timestamp": _null(timestamp),
        "external_id": external_id,
        "created_at": created_at,
    }


def _count_messages(conn: Connection, fresh: Sequence[Record], tally: dict[int, _Tally]) -> None:
    # As SQLite's writer counts them: per conversation, the rows inserted and the latest message time
    # of the deliveries that inserted any.
    counts = message_counts((delivery, tally[id(delivery)].inserted) for delivery in fresh)
    if counts:
        ids = sorted(counts)
        conn.execute(sql.COUNT_MESSAGES, (ids, [counts[cid][0] for cid in ids], [_real(counts[cid][1]) for cid in ids]))
