"""A group commit, run in the writer's thread: one transaction for many deliveries.

The fast path writes the whole batch with a few multi-row statements and no savepoints. If some
delivery repeats rows already stored (a re-delivery), or the database refuses some delivery's rows,
the batch is rolled back and written again one delivery per savepoint: counts come out per delivery,
a refused one is reported, and every other one still commits. A refused delivery is also kept, raw
body and error, in ``dead_letters`` (in the same transaction, so it commits with the others), for
``transcriptd dead-letters retry`` once the cause is fixed.

Either way the transaction records what it changed, one change per conversation, in ``changes``
(storage.outbox), before it commits.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence

from storage import erasure, search_index
from storage import statements as sql
from storage.deliveries import (
    APPEND_EXTERNAL_ID,
    CHANGED_APPEND_COLUMNS,
    CHANGED_MESSAGE_COLUMNS,
    NULL,
    SEQ,
    VENDOR_ROLE,
    VENDOR_ROW_WIDTH,
    Record,
    Row,
    Rows,
    WriteResult,
    message_counts,
)
from storage.errors import StorageRejected
from storage.outbox import ChangeSet

log = logging.getLogger("transcriptd.storage")

Outcome = WriteResult | StorageRejected


def write_batch(conn: sqlite3.Connection, batch: Sequence[Record]) -> list[Outcome]:
    """Write ``batch`` in one transaction and commit; one outcome per delivery, in order (see ``commit_batch``)."""
    outcomes, _ = commit_batch(conn, batch)
    return outcomes


def commit_batch(
    conn: sqlite3.Connection, batch: Sequence[Record], *, record_changes: bool = True
) -> tuple[list[Outcome], int | None]:
    """Write ``batch`` in one transaction, with its changes, and commit: one outcome per delivery, in order,
    and the position of the last change recorded (None: nothing changed).

    ``sqlite3.OperationalError`` (disk full, locked, read-only, I/O) is a fault of the storage, not of a
    delivery: it propagates, the transaction is rolled back, and nothing of the batch is stored.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        try:
            changes = ChangeSet(enabled=record_changes)
            outcomes: list[Outcome] = list(write_deliveries(conn, batch, changes, batch_wide=True))
        except sqlite3.OperationalError:
            raise
        except (_RowsAlreadyThere, *REFUSALS):
            # Re-deliveries to count, or rows the database refused (ValueError: strings that cannot be
            # encoded, such as lone surrogates, at bind time): one delivery at a time, each in a savepoint.
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            changes = ChangeSet(enabled=record_changes)
            outcomes = [_write_isolated(conn, delivery, changes) for delivery in batch]
        position = changes.record(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes, position


# What the database raises when it refuses a delivery's rows (ValueError: strings that cannot be encoded,
# such as lone surrogates, at bind time). sqlite3.OperationalError is not among them: it is a fault of
# the storage, and callers let it fail the whole transaction.
REFUSALS = (sqlite3.DatabaseError, ValueError, OverflowError)


def write_in_savepoint(
    conn: sqlite3.Connection, delivery: Record, changes: ChangeSet, *, store_events: bool = True
) -> WriteResult | Exception:
    """Write one delivery inside the open transaction, in a savepoint of its own: if the database refuses
    its rows, only they are rolled back, and the refusal is returned rather than raised. What it changed
    is noted in ``changes``, for the caller to record once, before its commit."""
    conn.execute("SAVEPOINT delivery")
    try:
        (result,) = write_deliveries(conn, [delivery], changes, store_events=store_events)
    except sqlite3.OperationalError:
        raise
    except REFUSALS as exc:
        conn.execute("ROLLBACK TO delivery")
        conn.execute("RELEASE delivery")
        return exc
    conn.execute("RELEASE delivery")
    return result


def _write_isolated(conn: sqlite3.Connection, delivery: Record, changes: ChangeSet) -> Outcome:
    result = write_in_savepoint(conn, delivery, changes)
    if isinstance(result, Exception):
        log.error("delivery rejected by the database: %s: %s", result.__class__.__name__, result)
        _dead_letter(conn, delivery, f"{result.__class__.__name__}: {result}")
        return StorageRejected(f"the database rejected this delivery: {result}")
    return result


# A delivery refused again while unresolved (the sender retries) keeps one row: attempts go up.
DEAD_LETTER = """
INSERT INTO dead_letters (delivery_key, source, event_type, conversation_id, received_at, body, error, failed_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (delivery_key) WHERE resolved_at IS NULL DO UPDATE SET
    attempts = attempts + 1, error = excluded.error, failed_at = excluded.failed_at,
    received_at = excluded.received_at, body = excluded.body
"""


def _dead_letter(conn: sqlite3.Connection, delivery: Record, error: str) -> None:
    """Keep a refused delivery in ``dead_letters``, inside the open transaction. A failure to do so is
    logged, not raised (the delivery is answered 5xx and retried by its sender anyway), except a fault of
    the storage, which fails the whole batch like any other."""
    texts = (delivery.key, delivery.source, delivery.event_type, delivery.conversation_id)
    row = (*map(_storable, texts), delivery.received_at, delivery.body, _storable(error), time.time())
    try:
        conn.execute(DEAD_LETTER, row)
    except sqlite3.OperationalError:
        raise
    except REFUSALS as exc:
        log.error("could not keep the rejected delivery as a dead letter: %s: %s", exc.__class__.__name__, exc)


def _storable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (maybe the very reason for the refusal) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _RowsAlreadyThere(Exception):
    """The batch-wide message insert skipped rows: some delivery repeats stored positions."""


def write_deliveries(
    conn: sqlite3.Connection,
    batch: Sequence[Record],
    changes: ChangeSet,
    *,
    batch_wide: bool = False,
    store_events: bool = True,
) -> list[WriteResult]:
    """Store every delivery not seen before, inside the open transaction; a delivery seen before (same
    key, in the database or earlier in this batch) changes nothing.

    ``batch_wide``: insert the transcript rows of every delivery together, a few statements for the
    whole batch. That only tells how many rows went in overall, so if any were already there it raises
    ``_RowsAlreadyThere`` and the caller writes the batch again delivery by delivery.

    ``store_events=False`` (replay): the events are the ones already stored, re-parsed. They are neither
    looked up nor inserted: only their conversations and messages are written (idempotently).

    A delivery whose conversation was erased (has a tombstone) stores nothing, not even its event: its
    result says ``erased``, and its tombstone counts it.

    What the deliveries change is noted in ``changes`` only once all of them are written: if this raises,
    nothing of it was noted.
    """
    # One query for the whole batch: deliveries for an erased conversation are dropped, stored nowhere.
    erased = erasure.tombstoned(conn, [d.conversation_id for d in batch])
    if erased:
        _count_dropped(conn, [d for d in batch if d.conversation_id in erased])
    keys = [(d.key,) for d in batch if d.conversation_id not in erased] if store_events else []
    seen = {row[0] for row in sql.select_rows(conn, sql.EXISTING_KEYS, keys, sql.EXISTING_KEYS_TAIL)}
    fresh: list[Record] = []
    for delivery in batch:
        if delivery.conversation_id in erased:
            continue
        if delivery.key not in seen:
            seen.add(delivery.key)
            fresh.append(delivery)
    fresh_ids = {id(d) for d in fresh}
    changes.track(conn, [d.conversation_id for d in fresh])
    if store_events:
        sql.insert_rows(
            conn,
            sql.INSERT_EVENTS,
            [(d.key, d.source, d.event_type, d.conversation_id, d.received_at, d.body) for d in fresh],
        )
        partial = [(d.problems, d.key) for d in fresh if d.problems]
        if partial:
            conn.executemany(sql.MARK_PARTIAL_EVENTS, partial)
    sql.insert_rows(
        conn, sql.UPSERT_CONVERSATIONS, [_conversation_row(d) for d in fresh], sql.UPSERT_CONVERSATIONS_TAIL
    )

    if batch_wide:
        # Each delivery's rows have one shape (storage.deliveries.VendorMessageRow): one statement per shape.
        before = search_index.last_id(conn)
        plain: list[Row] = []
        vendor: list[Row] = []
        for d in fresh:
            if d.rows:
                (vendor if len(d.rows[0]) == VENDOR_ROW_WIDTH else plain).extend(d.rows)
        inserted = sql.insert_rows(conn, sql.INSERT_MESSAGES, plain, sql.INSERT_MESSAGES_TAIL)
        if vendor:
            inserted += sql.insert_rows(conn, sql.INSERT_VENDOR_MESSAGES, vendor, sql.INSERT_MESSAGES_TAIL)
        if inserted < len(plain) + len(vendor):
            raise _RowsAlreadyThere
        search_index.index_after(conn, before)

    results: list[WriteResult] = []
    noted: list[tuple[str, int, int, list[int]]] = []
    stored: list[tuple[Record, int]] = []
    for delivery in batch:
        if delivery.conversation_id in erased:
            results.append(WriteResult(delivery.received, 0, 0, delivery.rejected, erased=True))
            continue
        if id(delivery) not in fresh_ids:
            results.append(WriteResult(delivery.received, 0, 0, delivery.rejected, duplicate_delivery=True))
            continue
        inserted, updated, seqs = _write_messages(conn, delivery, transcript_written=batch_wide)
        results.append(WriteResult(delivery.received, inserted, updated, delivery.rejected))
        if inserted or updated:
            noted.append((delivery.conversation_id, inserted, updated, seqs))
        stored.append((delivery, inserted))
    if counts := message_counts(stored):
        sql.insert_rows(
            conn, sql.COUNT_MESSAGES, [(cid, n, last) for cid, (n, last) in counts.items()], sql.COUNT_MESSAGES_TAIL
        )
    for cid, inserted, updated, seqs in noted:
        changes.messages(cid, inserted, updated, seqs)
    return results


def _count_dropped(conn: sqlite3.Connection, dropped: Sequence[Record]) -> None:
    """Count the dropped deliveries on their tombstones, in the same transaction (the writer logs them once
    committed, and counts them in its metrics)."""
    per_conversation: dict[str, int] = {}
    for delivery in dropped:
        per_conversation[delivery.conversation_id] = per_conversation.get(delivery.conversation_id, 0) + 1
    erasure.count_dropped(conn, per_conversation, time.time())


def _conversation_row(delivery: Record) -> tuple[object, ...]:
    patch = delivery.patch
    return (
        delivery.conversation_id,
        delivery.source,
        patch.status or "active",
        *[NULL if (value := getattr(patch, column)) is None else value for column in sql.PATCH_COLUMNS],
        NULL if delivery.metadata is None else delivery.metadata,
        delivery.received_at,
        delivery.received_at,
    )


def _insert_for(rows: Rows) -> str:
    return sql.INSERT_VENDOR_MESSAGES if len(rows[0]) == VENDOR_ROW_WIDTH else sql.INSERT_MESSAGES


def _write_messages(
    conn: sqlite3.Connection, delivery: Record, *, transcript_written: bool
) -> tuple[int, int, list[int]]:
    """Messages inserted, messages updated, and the positions of both (for the change's seq range: on
    the batch-wide path the two ends of the delivery's rows, all of which went in)."""
    inserted = updated = 0
    seqs: list[int] = []
    if transcript_written:
        inserted = len(delivery.rows)
        if delivery.rows:
            positions = [row[SEQ] for row in delivery.rows]
            seqs = [min(positions), max(positions)]
    elif delivery.rows:
        before = search_index.last_id(conn)
        seqs = [
            row[0]
            for row in sql.insert_returning(conn, _insert_for(delivery.rows), delivery.rows, sql.INSERT_MESSAGES_TAIL)
        ]
        inserted = len(seqs)
        # Indexed before any update below: reindex() replaces a changed row's entry, so it must be there.
        search_index.index_after(conn, before)
        if inserted < len(delivery.rows):
            vendor = len(delivery.rows[0]) == VENDOR_ROW_WIDTH
            # Every row, not only the skipped ones: a delivery may repeat a position (a client id sent
            # twice), and its later entry wins, as it would on a later delivery.
            changed = [row[:_CHANGED] if vendor else (*row[:VENDOR_ROLE], None) for row in delivery.rows]
            texts = _changed_texts(conn, CHANGED_TEXT, [(*row[:_KEY], row[_CONTENT]) for row in changed])
            # Row by row, to learn which positions changed (executemany cannot return rows); only on a
            # re-delivery that repeats stored positions.
            for row in changed:
                if (found := conn.execute(sql.UPDATE_CHANGED_MESSAGE, row).fetchone()) is not None:
                    updated += 1
                    seqs.append(found[0])
            search_index.reindex(conn, texts)
    if delivery.append_rows:
        before = search_index.last_id(conn)
        # The generic endpoint carries a few messages a request: one statement each, returning its position.
        # A client id already stored is an update, made after the appends (and their index entries).
        repeated: list[tuple[object, ...]] = []
        for append_row in delivery.append_rows:
            if (found := conn.execute(sql.APPEND_MESSAGE, append_row).fetchone()) is not None:
                inserted += 1
                seqs.append(found[0])
            elif append_row[APPEND_EXTERNAL_ID] is not None:
                repeated.append(append_row[:_APPEND_CHANGED])
        search_index.index_after(conn, before)
        if repeated:
            keys: list[tuple[object, ...]] = [
                (*row[:_STREAM], row[APPEND_EXTERNAL_ID], row[_APPEND_CONTENT]) for row in repeated
            ]
            texts = _changed_texts(conn, CHANGED_TEXT_BY_EXTERNAL_ID, keys)
            for key in repeated:
                if (found := conn.execute(sql.UPDATE_CHANGED_BY_EXTERNAL_ID, key).fetchone()) is not None:
                    updated += 1
                    seqs.append(found[0])
            search_index.reindex(conn, texts)
    return inserted, updated, seqs


# Slice bounds and positions in the rows (storage.deliveries' column declarations).
_CHANGED = len(CHANGED_MESSAGE_COLUMNS)  # a vendor row's columns UPDATE_CHANGED_MESSAGE binds
_KEY = CHANGED_MESSAGE_COLUMNS.index("seq") + 1  # conversation_id, source, seq
_CONTENT = CHANGED_MESSAGE_COLUMNS.index("content")
_APPEND_CHANGED = len(CHANGED_APPEND_COLUMNS)  # an appended row's columns UPDATE_CHANGED_BY_EXTERNAL_ID binds
_STREAM = CHANGED_APPEND_COLUMNS.index("source") + 1  # conversation_id, source
_APPEND_CONTENT = CHANGED_APPEND_COLUMNS.index("content")

# The stored text of a message an update is about to change, for the search index (?4: the new text).
CHANGED_TEXT = (
    "SELECT id, content FROM messages WHERE conversation_id = ?1 AND source = ?2 AND seq = ?3 AND content IS NOT ?4"
)
CHANGED_TEXT_BY_EXTERNAL_ID = (
    "SELECT id, content FROM messages "  # the external id's partial index serves it
    "WHERE conversation_id = ?1 AND source = ?2 AND external_id = ?3 AND content IS NOT ?4"
)


def _changed_texts(conn: sqlite3.Connection, query: str, keys: list[tuple[object, ...]]) -> list[tuple[int, str]]:
    """(id, text now) of each message whose text the update will change: only a re-delivery that differs
    from what is stored comes here, a few rows at a time."""
    found: dict[int, str] = {}
    for key in keys:
        for rowid, content in conn.execute(query, key):
            found.setdefault(rowid, content)
    return list(found.items())
