"""Outbound webhooks' state on PostgreSQL: the same functions, rows and answers as storage.notifications.

Several replicas share the tables. One of them sends at a time (it holds the leader lock,
storage.postgres.leader), but any may take changes in or prune, so:

- ``take_in`` locks the receiver's cursor row (``FOR UPDATE``) before reading it: two replicas taking in
  for one receiver queue, and the second starts where the first left off. The notifications go in with
  ``ON CONFLICT DO NOTHING`` anyway, so a change is never owed twice. A receiver's first cursor is
  inserted with ``ON CONFLICT DO NOTHING``: two first calls at once leave one.
- Only committed changes are taken in, and a cursor never passes a change still to commit: positions
  become visible in position order (storage.postgres.outbox).
- ``settle_and_take_in`` locks cursors in receiver order, so two replicas never wait on each other in a
  cycle; a deadlock or serialization failure all the same is retried whole, as are ``prune``'s.
- ``prune`` claims the changes it deletes with ``FOR UPDATE SKIP LOCKED``: two replicas pruning at once
  delete disjoint sets, neither waits on the other.

Every function takes an autocommit connection with no transaction open, except ``record`` and ``take_in``,
which run inside the caller's (as on SQLite).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from storage.notifications import Attempted, Due, Pending
from storage.postgres.connection import Connection
from storage.postgres.writes import ATTEMPTS, RETRIED, RETRY_PAUSE_S

__all__ = [
    "Attempted",
    "Due",
    "Pending",
    "due",
    "oldest_change_at",
    "pending_stats",
    "prune",
    "record",
    "retry",
    "settle_and_take_in",
    "take_in",
    "undelivered",
]

NEWEST = "SELECT coalesce(max(position), 0) FROM changes"
LOCK_CURSOR = "SELECT position FROM notify_cursors WHERE receiver = %s FOR UPDATE"
CURSOR = "SELECT position FROM notify_cursors WHERE receiver = %s"
FIRST_CURSOR = "INSERT INTO notify_cursors (receiver, position) VALUES (%s, %s) ON CONFLICT (receiver) DO NOTHING"
SET_CURSOR = "UPDATE notify_cursors SET position = %s WHERE receiver = %s"
TAKE_UNTIL = "SELECT max(position) FROM (SELECT position FROM changes WHERE position > %s ORDER BY position LIMIT %s) t"
TAKE_IN = """
INSERT INTO notifications (receiver, position, conversation_id, started_at, next_attempt_at)
SELECT %(receiver)s, position, conversation_id, %(now)s, %(now)s FROM changes
WHERE position > %(cursor)s AND position <= %(until)s
ORDER BY position
ON CONFLICT (receiver, position) DO NOTHING
"""

DELIVERED = """
UPDATE notifications SET attempts = attempts + 1, last_status = %s, last_error = NULL, delivered_at = %s
WHERE receiver = %s AND position = %s AND delivered_at IS NULL
"""
# A change that left the outbox before it was sent (its conversation was erased): settled, nothing to send.
DROPPED = """
UPDATE notifications SET last_error = %s, delivered_at = %s
WHERE receiver = %s AND position = %s AND delivered_at IS NULL
"""
RETRY_LATER = """
UPDATE notifications SET attempts = attempts + 1, last_status = %s, last_error = %s, next_attempt_at = %s
WHERE receiver = %s AND position = %s AND delivered_at IS NULL AND failed_at IS NULL
"""
GIVE_UP = """
UPDATE notifications SET attempts = attempts + 1, last_status = %s, last_error = %s, failed_at = %s
WHERE receiver = %s AND position = %s AND delivered_at IS NULL AND failed_at IS NULL
"""

# The heads of the receiver's conversations that are due (storage.notifications.DUE).
DUE = """
SELECT n.position, n.conversation_id, n.attempts, n.started_at,
       c.source, c.status, c.kinds, c.first_seq, c.last_seq, c.committed_at, c.position IS NOT NULL
FROM notifications n LEFT JOIN changes c ON c.position = n.position
WHERE n.receiver = %(receiver)s AND n.delivered_at IS NULL AND n.failed_at IS NULL
  AND n.next_attempt_at <= %(now)s
  AND n.position = (
      SELECT min(m.position) FROM notifications m
      WHERE m.receiver = %(receiver)s AND m.conversation_id = n.conversation_id
        AND m.delivered_at IS NULL AND m.failed_at IS NULL
  )
ORDER BY n.position LIMIT %(limit)s
"""
PENDING_STATS = """
SELECT count(*), min(started_at) FROM notifications
WHERE receiver = %s AND delivered_at IS NULL AND failed_at IS NULL
"""

LIST = """
SELECT n.receiver, n.position, n.conversation_id, n.attempts, n.started_at, n.next_attempt_at,
       n.last_status, n.last_error, n.failed_at
FROM notifications n
WHERE n.delivered_at IS NULL AND (NOT %(failed_only)s OR n.failed_at IS NOT NULL)
ORDER BY n.position, n.receiver LIMIT %(limit)s
"""
RETRY_FAILED = """
UPDATE notifications SET failed_at = NULL, attempts = 0, started_at = %(now)s, next_attempt_at = %(now)s
WHERE failed_at IS NOT NULL AND delivered_at IS NULL
"""
RETRY_CHANGE = """
UPDATE notifications SET failed_at = NULL, attempts = 0, started_at = %(now)s, next_attempt_at = %(now)s
WHERE position = %(position)s AND delivered_at IS NULL
"""

# Retention (storage.notifications.PRUNE_CHANGES), each replica claiming rows no other is deleting.
PRUNE_CHANGES = """
DELETE FROM changes WHERE position IN (
    SELECT c.position FROM changes c
    WHERE c.committed_at < %(cutoff)s AND c.position <= %(taken)s
      AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.position = c.position AND n.delivered_at IS NULL)
    ORDER BY c.position LIMIT %(limit)s
    FOR UPDATE OF c SKIP LOCKED
)
"""
PRUNE_DELIVERED = """
DELETE FROM notifications WHERE (receiver, position) IN (
    SELECT n.receiver, n.position FROM notifications n
    WHERE n.delivered_at < %(cutoff)s AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.position = n.position)
    LIMIT %(limit)s
    FOR UPDATE OF n SKIP LOCKED
)
"""

T = TypeVar("T")


def _retried(conn: Connection, work: Callable[[], T]) -> T:
    """``work`` in one transaction, run again whole after a deadlock or serialization failure."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with conn.transaction():
                return work()
        except RETRIED:
            if attempt == ATTEMPTS:
                raise
            time.sleep(random.uniform(0, RETRY_PAUSE_S * attempt))
    raise AssertionError("unreachable")


def settle_and_take_in(
    attempted: Sequence[Attempted], receivers: Iterable[str], now: float, limit: int, conn: Connection
) -> bool:
    """Record ``attempted`` and take in up to ``limit`` new changes per receiver, in one transaction; True
    if some receiver took ``limit`` in (there may be more)."""
    ordered = sorted(receivers)  # the one order cursors are locked in

    def work() -> bool:
        record(conn, attempted)
        more = False
        for receiver in ordered:  # every one: no short cut once one has more
            more |= take_in(conn, receiver, now, limit) >= limit
        return more

    return _retried(conn, work)


def record(conn: Connection, attempted: Sequence[Attempted]) -> None:
    """Record what the attempts came to, inside the open transaction."""
    for a in attempted:
        if a.outcome == "delivered":
            conn.execute(DELIVERED, (a.status, a.at, a.receiver, a.position))
        elif a.outcome == "dropped":
            conn.execute(DROPPED, (a.error, a.at, a.receiver, a.position))
        elif a.outcome == "retry":
            conn.execute(RETRY_LATER, (a.status, a.error, a.next_attempt_at, a.receiver, a.position))
        else:
            conn.execute(GIVE_UP, (a.status, a.error, a.at, a.receiver, a.position))


def take_in(conn: Connection, receiver: str, now: float, limit: int) -> int:
    """Take in the next changes (at most ``limit``) for ``receiver``, inside the open transaction; how many.
    A receiver never seen before starts after the newest change."""
    row = conn.execute(LOCK_CURSOR, (receiver,)).fetchone()
    if row is None:
        newest = conn.execute(NEWEST).fetchone()
        conn.execute(FIRST_CURSOR, (receiver, newest[0] if newest else 0))
        return 0
    cursor = int(row[0])
    until_row = conn.execute(TAKE_UNTIL, (cursor, limit)).fetchone()
    until = None if until_row is None else until_row[0]
    if until is None:
        return 0
    taken = conn.execute(TAKE_IN, {"receiver": receiver, "cursor": cursor, "until": until, "now": now}).rowcount
    conn.execute(SET_CURSOR, (until, receiver))
    return taken


def due(conn: Connection, receiver: str, now: float, limit: int) -> list[Due]:
    """The heads of ``receiver``'s conversations due by ``now``, oldest first, at most ``limit``."""
    rows = conn.execute(DUE, {"receiver": receiver, "now": now, "limit": limit}).fetchall()
    return [_due(row) for row in rows]


def _due(row: tuple[Any, ...]) -> Due:
    position, conversation_id, attempts, started_at, source, status, kinds, first_seq, last_seq, at, kept = row
    return Due(
        position, conversation_id, attempts, started_at, source, status, kinds, first_seq, last_seq, at, bool(kept)
    )


def pending_stats(conn: Connection, receiver: str) -> tuple[int, float | None]:
    """How many changes ``receiver`` is owed, and when the oldest of them was taken in (None: none)."""
    row = conn.execute(PENDING_STATS, (receiver,)).fetchone()
    assert row is not None
    return int(row[0]), None if row[1] is None else float(row[1])


def undelivered(conn: Connection, *, failed_only: bool = False, limit: int = 10_000) -> list[Pending]:
    """The changes not delivered (or only the failed ones), by position, for every receiver ever configured."""
    return [Pending(*row) for row in conn.execute(LIST, {"failed_only": failed_only, "limit": limit}).fetchall()]


def retry(conn: Connection, now: float, position: int | None = None) -> int:
    """Make failed changes pending again, due now, with a fresh ``notify.max_age``: every failed one, or
    only change ``position`` (failed or still pending); how many rows (one per receiver) changed."""
    with conn.transaction():
        if position is None:
            return conn.execute(RETRY_FAILED, {"now": now}).rowcount
        return conn.execute(RETRY_CHANGE, {"position": position, "now": now}).rowcount


def oldest_change_at(conn: Connection) -> float | None:
    """When the first change still in the outbox was committed (None: it is empty)."""
    row = conn.execute("SELECT committed_at FROM changes ORDER BY position LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def prune(cutoff: float, receivers: Sequence[str], conn: Connection, limit: int = 1000) -> int:
    """Delete up to ``limit`` changes committed before ``cutoff`` that every receiver has had (delivered),
    with their delivered rows, in one transaction; how many changes went."""

    def work() -> int:
        taken_everywhere = 2**63 - 1
        for receiver in receivers:
            row = conn.execute(CURSOR, (receiver,)).fetchone()
            taken_everywhere = min(taken_everywhere, int(row[0]) if row else 0)
        params = {"cutoff": cutoff, "taken": taken_everywhere, "limit": limit}
        pruned = conn.execute(PRUNE_CHANGES, params).rowcount
        conn.execute(PRUNE_DELIVERED, {"cutoff": cutoff, "limit": limit})
        return pruned

    return _retried(conn, work)
