"""Outbound webhooks' state: which changes of the outbox each receiver has been sent, is owed, or gave up on.

A receiver takes changes in from the outbox (``changes``) in position order, a bounded number at a time,
one ``notifications`` row each; ``notify_cursors`` remembers the last one taken in. Only the head of a
conversation (its smallest pending position) is ever due: a later change waits until the earlier one is
delivered or given up. The writes run on the writer's connection (the daemon's jobs) or on an operator
command's own, in short ``BEGIN IMMEDIATE`` transactions; the reads on a read-only connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from storage.connection import immediate

# A new receiver starts at the newest change: configuring a URL does not send it the whole history (the
# change feed replays that). NULL when the outbox is empty: it then starts at 0.
NEWEST = "SELECT coalesce(max(position), 0) FROM changes"
CURSOR = "SELECT position FROM notify_cursors WHERE receiver = ?"
SET_CURSOR = """
INSERT INTO notify_cursors (receiver, position) VALUES (?1, ?2)
ON CONFLICT (receiver) DO UPDATE SET position = excluded.position
"""
TAKE_UNTIL = "SELECT max(position) FROM (SELECT position FROM changes WHERE position > ?1 ORDER BY position LIMIT ?2)"
TAKE_IN = """
INSERT OR IGNORE INTO notifications (receiver, position, conversation_id, started_at, next_attempt_at)
SELECT ?1, position, conversation_id, ?4, ?4 FROM changes WHERE position > ?2 AND position <= ?3
"""

DELIVERED = """
UPDATE notifications SET attempts = attempts + 1, last_status = ?3, last_error = NULL, delivered_at = ?4
WHERE receiver = ?1 AND position = ?2 AND delivered_at IS NULL
"""
# A change that left the outbox before it was sent (its conversation was erased): nothing left to send; it
# counts as settled, and the erasure's own change tells the receiver.
DROPPED = """
UPDATE notifications SET last_error = ?3, delivered_at = ?4
WHERE receiver = ?1 AND position = ?2 AND delivered_at IS NULL
"""
RETRY_LATER = """
UPDATE notifications SET attempts = attempts + 1, last_status = ?3, last_error = ?4, next_attempt_at = ?5
WHERE receiver = ?1 AND position = ?2 AND delivered_at IS NULL AND failed_at IS NULL
"""
GIVE_UP = """
UPDATE notifications SET attempts = attempts + 1, last_status = ?3, last_error = ?4, failed_at = ?5
WHERE receiver = ?1 AND position = ?2 AND delivered_at IS NULL AND failed_at IS NULL
"""

# The heads of the receiver's conversations that are due: the pending row with the smallest position of its
# conversation. LEFT JOIN: a change gone from the outbox (pruned by hand) still shows, so it can be settled.
DUE = """
SELECT n.position, n.conversation_id, n.attempts, n.started_at,
       c.source, c.status, c.kinds, c.first_seq, c.last_seq, c.committed_at, c.position IS NOT NULL
FROM notifications n LEFT JOIN changes c ON c.position = n.position
WHERE n.receiver = ?1 AND n.delivered_at IS NULL AND n.failed_at IS NULL AND n.next_attempt_at <= ?2
  AND n.position = (
      SELECT min(m.position) FROM notifications m
      WHERE m.receiver = ?1 AND m.conversation_id = n.conversation_id
        AND m.delivered_at IS NULL AND m.failed_at IS NULL
  )
ORDER BY n.position LIMIT ?3
"""
PENDING_STATS = """
SELECT count(*), min(started_at) FROM notifications WHERE receiver = ? AND delivered_at IS NULL AND failed_at IS NULL
"""

LIST = """
SELECT n.receiver, n.position, n.conversation_id, n.attempts, n.started_at, n.next_attempt_at,
       n.last_status, n.last_error, n.failed_at
FROM notifications n
WHERE n.delivered_at IS NULL AND (?1 = 0 OR n.failed_at IS NOT NULL)
ORDER BY n.position, n.receiver LIMIT ?2
"""
RETRY_FAILED = """
UPDATE notifications SET failed_at = NULL, attempts = 0, started_at = ?1, next_attempt_at = ?1
WHERE failed_at IS NOT NULL AND delivered_at IS NULL
"""
RETRY_CHANGE = """
UPDATE notifications SET failed_at = NULL, attempts = 0, started_at = ?2, next_attempt_at = ?2
WHERE position = ?1 AND delivered_at IS NULL
"""

# Retention: a change older than the cutoff goes once every receiver has taken it in (position <= ?2) and
# none still owes it (a failed one is kept, for `notifications retry`); its delivered rows go with it.
PRUNE_CHANGES = """
DELETE FROM changes WHERE position IN (
    SELECT c.position FROM changes c
    WHERE c.committed_at < ?1 AND c.position <= ?2
      AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.position = c.position AND n.delivered_at IS NULL)
    ORDER BY c.position LIMIT ?3
)
"""
PRUNE_DELIVERED = """
DELETE FROM notifications WHERE (receiver, position) IN (
    SELECT n.receiver, n.position FROM notifications n
    WHERE n.delivered_at < ?1 AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.position = n.position)
    LIMIT ?2
)
"""


@dataclass(frozen=True, slots=True)
class Due:
    """A change the receiver is owed now: the head of its conversation."""

    position: int
    conversation_id: str
    attempts: int
    started_at: float
    source: str | None
    status: str | None
    kinds: str | None  # JSON object text, as the outbox stored it
    first_seq: int | None
    last_seq: int | None
    committed_at: float | None
    in_outbox: bool  # False: the change left the outbox (its conversation was erased); nothing to send


@dataclass(frozen=True, slots=True)
class Attempted:
    """What one attempt came to, to record: delivered, retry at ``next_attempt_at``, or given up (failed)."""

    receiver: str
    position: int
    conversation_id: str
    outcome: str  # "delivered", "retry", "failed" or "dropped" (no longer in the outbox)
    at: float  # when the attempt ended
    status: int | None = None
    error: str | None = None
    next_attempt_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Pending:
    """A change not delivered to a receiver: pending (being tried) or failed (given up)."""

    receiver: str
    position: int
    conversation_id: str
    attempts: int
    started_at: float
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    failed_at: float | None


def settle_and_take_in(
    attempted: Sequence[Attempted], receivers: Iterable[str], now: float, limit: int, conn: sqlite3.Connection
) -> bool:
    """Record ``attempted`` and take in up to ``limit`` new changes per receiver, in one transaction; True
    if some receiver took ``limit`` in (there may be more)."""
    with immediate(conn):
        record(conn, attempted)
        more = False
        for receiver in receivers:  # every one: no short cut once one has more
            more |= take_in(conn, receiver, now, limit) >= limit
        return more


def record(conn: sqlite3.Connection, attempted: Sequence[Attempted]) -> None:
    """Record what the attempts came to, inside the open transaction."""
    for a in attempted:
        if a.outcome == "delivered":
            conn.execute(DELIVERED, (a.receiver, a.position, a.status, a.at))
        elif a.outcome == "dropped":
            conn.execute(DROPPED, (a.receiver, a.position, a.error, a.at))
        elif a.outcome == "retry":
            conn.execute(RETRY_LATER, (a.receiver, a.position, a.status, a.error, a.next_attempt_at))
        else:
            conn.execute(GIVE_UP, (a.receiver, a.position, a.status, a.error, a.at))


def take_in(conn: sqlite3.Connection, receiver: str, now: float, limit: int) -> int:
    """Take in the next changes (at most ``limit``) for ``receiver``, inside the open transaction; how many.
    A receiver never seen before starts after the newest change."""
    row = conn.execute(CURSOR, (receiver,)).fetchone()
    if row is None:
        conn.execute(SET_CURSOR, (receiver, conn.execute(NEWEST).fetchone()[0]))
        return 0
    cursor: int = row[0]
    (until,) = conn.execute(TAKE_UNTIL, (cursor, limit)).fetchone()
    if until is None:
        return 0
    taken = conn.execute(TAKE_IN, (receiver, cursor, until, now)).rowcount
    conn.execute(SET_CURSOR, (receiver, until))
    return taken


def due(conn: sqlite3.Connection, receiver: str, now: float, limit: int) -> list[Due]:
    """The heads of ``receiver``'s conversations due by ``now``, oldest first, at most ``limit``."""
    rows = conn.execute(DUE, (receiver, now, limit)).fetchall()
    return [_due(row) for row in rows]


def _due(row: tuple[Any, ...]) -> Due:
    position, conversation_id, attempts, started_at, source, status, kinds, first_seq, last_seq, at, kept = row
    return Due(
        position, conversation_id, attempts, started_at, source, status, kinds, first_seq, last_seq, at, bool(kept)
    )


def pending_stats(conn: sqlite3.Connection, receiver: str) -> tuple[int, float | None]:
    """How many changes ``receiver`` is owed, and when the oldest of them was taken in (None: none)."""
    count, oldest = conn.execute(PENDING_STATS, (receiver,)).fetchone()
    return count, oldest


def undelivered(conn: sqlite3.Connection, *, failed_only: bool = False, limit: int = 10_000) -> list[Pending]:
    """The changes not delivered (or only the failed ones), by position, for every receiver ever configured."""
    return [Pending(*row) for row in conn.execute(LIST, (int(failed_only), limit)).fetchall()]


def retry(conn: sqlite3.Connection, now: float, position: int | None = None) -> int:
    """Make failed changes pending again, due now, with a fresh ``notify.max_age``: every failed one, or
    only change ``position`` (failed or still pending); how many rows (one per receiver) changed."""
    with immediate(conn):
        if position is None:
            return conn.execute(RETRY_FAILED, (now,)).rowcount
        return conn.execute(RETRY_CHANGE, (position, now)).rowcount


def oldest_change_at(conn: sqlite3.Connection) -> float | None:
    """When the first change still in the outbox was committed (None: it is empty)."""
    row = conn.execute("SELECT committed_at FROM changes ORDER BY position LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def prune(cutoff: float, receivers: Sequence[str], conn: sqlite3.Connection, limit: int = 1000) -> int:
    """Delete up to ``limit`` changes committed before ``cutoff`` that every receiver has had (delivered),
    with their delivered rows, in one transaction; how many changes went."""
    with immediate(conn):
        taken_everywhere = 2**63 - 1
        for receiver in receivers:
            row = conn.execute(CURSOR, (receiver,)).fetchone()
            taken_everywhere = min(taken_everywhere, row[0] if row else 0)
        pruned = conn.execute(PRUNE_CHANGES, (cutoff, taken_everywhere, limit)).rowcount
        conn.execute(PRUNE_DELIVERED, (cutoff, limit))
    return pruned
