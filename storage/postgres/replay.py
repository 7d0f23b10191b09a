"""Replay on PostgreSQL: storage/replay.py's ``replay``, writing with the group commit's own code
(``write_deliveries`` with ``store_events=False``: the events are already stored, and are not claimed
again). The parsing, the batching and the positions of appended messages are storage/replay.py's.

Events are read in ``events.id`` order. Ids are handed out before commit, so across conversations that is
not commit order; within one conversation it is, since every writer claims a conversation's events under
its row lock (storage/postgres/writes.py), and the positions of appended messages depend only on their
own conversation's events.

Each batch is one transaction. A delivery whose text PostgreSQL cannot hold is refused before it starts;
one the server refuses rolls the batch back, which is then written again one delivery per savepoint, at
most ``MAX_SAVEPOINTS`` per transaction (as the group commit does). A deadlock with a writer (40P01)
rolls the batch back and writes it again whole.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping

from storage.deliveries import Record, WriteResult
from storage.errors import StorageUnavailable
from storage.postgres.connection import Connection
from storage.postgres.outbox import ChangeSet
from storage.postgres.retries import ATTEMPTS, RETRIED, RETRY_PAUSE_S
from storage.postgres.writes import MAX_SAVEPOINTS, REFUSALS, unstorable, write_deliveries
from storage.replay import (
    Parse,
    ReplayLimits,
    ReplayStats,
    StoredEvent,
    replay_bounds,
    replay_events,
    stored_events,
)

log = logging.getLogger("transcriptd.storage")

_EVENT = "SELECT id, delivery_key, source, event_type, conversation_id, received_at, body FROM events"
NEXT_EVENT = _EVENT + " WHERE id > %s AND id <= %s ORDER BY id LIMIT 1"
NEXT_EVENT_OF = _EVENT + " WHERE conversation_id = %s AND id > %s AND id <= %s ORDER BY id LIMIT 1"
EARLIER_EVENTS = _EVENT + " WHERE conversation_id = %s AND source = %s AND id < %s ORDER BY id"
EVENT_OF = "SELECT 1 FROM events WHERE conversation_id = %s LIMIT 1"

Batch = list[tuple[StoredEvent, Record]]


def replay(
    conn: Connection,
    parsers: Mapping[str, Parse],
    *,
    conversation_id: str | None = None,
    since: float | None = None,
    limits: ReplayLimits | None = None,
    on_failure: Callable[[StoredEvent, str], None] | None = None,
) -> ReplayStats:
    """Replay the events (of one conversation, and from the first one received at or after ``since``)
    up to the last one stored when the replay began. ``conn`` is in autocommit mode with no transaction
    open, as ``connect`` returns it.

    ``psycopg.OperationalError`` (a lost connection) or ``StorageUnavailable`` (deadlocks past the
    retries) stops the replay; what was committed until then stays, and replaying again is safe."""
    limits = limits or ReplayLimits()
    bounds = _bounds(conn, conversation_id, since)
    if bounds is None:
        return ReplayStats()

    def earlier(cid: str, source: str, before_id: int) -> list[StoredEvent]:
        return [StoredEvent(*row) for row in conn.execute(EARLIER_EVENTS, (cid, source, before_id)).fetchall()]

    def write(batch: Batch, stats: ReplayStats) -> None:
        _write(conn, batch, stats, on_failure)

    return replay_events(_events(conn, conversation_id, *bounds), parsers, earlier, write, limits, on_failure)


def has_events(conn: Connection, conversation_id: str) -> bool:
    """Whether any event of ``conversation_id`` is stored (a replay of it would find something)."""
    return conn.execute(EVENT_OF, (conversation_id,)).fetchone() is not None


def _bounds(conn: Connection, conversation_id: str | None, since: float | None) -> tuple[int, int] | None:
    return replay_bounds(lambda sql, params: conn.execute(sql, params).fetchone(), "%s", conversation_id, since)


def _events(conn: Connection, conversation_id: str | None, after: int, last: int) -> Iterator[StoredEvent]:
    if conversation_id is None:
        return stored_events(lambda at: conn.execute(NEXT_EVENT, (at, last)).fetchone(), after)
    return stored_events(lambda at: conn.execute(NEXT_EVENT_OF, (conversation_id, at, last)).fetchone(), after)


def _write(
    conn: Connection, batch: Batch, stats: ReplayStats, on_failure: Callable[[StoredEvent, str], None] | None
) -> None:
    refused: list[tuple[StoredEvent, str]] = []
    writable: Batch = []
    for event, delivery in batch:
        if (reason := unstorable(delivery)) is not None:
            refused.append((event, f"the database refused its rows: {reason}"))
        else:
            writable.append((event, delivery))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            try:
                results, transactions = _in_one_transaction(conn, writable), 1
            except REFUSALS as exc:
                log.warning("the database refused part of a replay batch, writing it one event at a time: %s", exc)
                results, transactions, refused_now = _isolated(conn, writable)
                refused += refused_now
            break
        except RETRIED as exc:
            if attempt == ATTEMPTS:
                raise StorageUnavailable(f"storage is unavailable: {exc.__class__.__name__} {ATTEMPTS} times") from exc
            time.sleep(random.uniform(0, RETRY_PAUSE_S * attempt))
    stats.events += len(results)
    stats.inserted += sum(result.inserted for result in results)
    stats.updated += sum(result.updated for result in results)
    stats.refused += len(refused)
    stats.transactions += transactions
    if on_failure is not None:
        for event, message in refused:
            on_failure(event, message)


def _in_one_transaction(conn: Connection, batch: Batch) -> list[WriteResult]:
    if not batch:
        return []
    with conn.transaction():
        changes = ChangeSet()
        results = write_deliveries(conn, [delivery for _, delivery in batch], changes, store_events=False)
        changes.record(conn)  # what the replay corrected, on the feed and to the receivers, as on SQLite
        return results


def _isolated(conn: Connection, batch: Batch) -> tuple[list[WriteResult], int, list[tuple[StoredEvent, str]]]:
    """Each delivery in a savepoint of its own, at most ``MAX_SAVEPOINTS`` per transaction: the results
    of those written, the transactions, and the events whose rows the server refused."""
    results: list[WriteResult] = []
    refused: list[tuple[StoredEvent, str]] = []
    transactions = 0
    for start in range(0, len(batch), MAX_SAVEPOINTS):
        chunk_results: list[WriteResult] = []
        chunk_refused: list[tuple[StoredEvent, str]] = []
        with conn.transaction():
            changes = ChangeSet()
            for event, delivery in batch[start : start + MAX_SAVEPOINTS]:
                tracked = changes.tracked()
                try:
                    with conn.transaction():  # a savepoint: a refusal rolls back this delivery alone
                        chunk_results.extend(write_deliveries(conn, [delivery], changes, store_events=False))
                except REFUSALS as exc:
                    changes.forget_since(tracked)
                    chunk_refused.append((event, f"the database refused its rows: {exc.__class__.__name__}: {exc}"))
            changes.record(conn)
        results += chunk_results
        refused += chunk_refused
        transactions += 1
    return results, transactions, refused
