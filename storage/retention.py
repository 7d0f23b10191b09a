"""Retention: delete conversations whose last activity is older than a cutoff, with their messages and events.

Deletion goes a few conversations per transaction (``BEGIN IMMEDIATE … COMMIT``), so the daemon's writer,
which needs the same write lock, waits at most one small batch. The old conversations are chosen inside
that transaction, under the write lock: a conversation that a delivery refreshed a moment earlier is no
longer old, and a delivery arriving a moment later finds no trace of the deleted one and starts afresh.

Both functions take a connection in autocommit mode (``isolation_level=None``), such as ``open_writer``'s,
with no transaction open.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from storage.connection import immediate
from storage.search_index import unindex_where

# A batch also stops growing past this many messages, so one long conversation or many make no long lock.
MAX_BATCH_MESSAGES = 20_000

PLAN = """
SELECT
    (SELECT count(*) FROM conversations WHERE updated_at < ?1),
    (SELECT count(*) FROM messages WHERE conversation_id IN (SELECT id FROM conversations WHERE updated_at < ?1)),
    (SELECT count(*) FROM events WHERE conversation_id IN (SELECT id FROM conversations WHERE updated_at < ?1))
"""

# The oldest first, in a total order (id breaks ties): inside one transaction, the same ?1 and ?2 name
# the same conversations in each statement below. Fixed text, so each is prepared once and cached.
OLDEST = "SELECT message_count FROM conversations WHERE updated_at < ?1 ORDER BY updated_at, id LIMIT ?2"
_BATCH = "SELECT id FROM conversations WHERE updated_at < ?1 ORDER BY updated_at, id LIMIT ?2"
DELETE_EVENTS = f"DELETE FROM events WHERE conversation_id IN ({_BATCH})"  # noqa: S608 (constant text)
DELETE_MESSAGES = f"DELETE FROM messages WHERE conversation_id IN ({_BATCH})"  # noqa: S608 (constant text)
UNINDEX_MESSAGES = unindex_where(f"conversation_id IN ({_BATCH})")
DELETE_CONVERSATIONS = f"DELETE FROM conversations WHERE id IN ({_BATCH})"  # noqa: S608 (constant text)


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What a prune with this cutoff would delete now."""

    cutoff: float
    conversations: int
    messages: int
    events: int


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch deleted."""

    conversations: int = 0
    messages: int = 0
    events: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            self.conversations + other.conversations, self.messages + other.messages, self.events + other.events
        )


def plan(conn: sqlite3.Connection, cutoff: float) -> RetentionPlan:
    """Count the conversations last updated before ``cutoff`` (Unix seconds), their messages and events."""
    conversations, messages, events = conn.execute(PLAN, (cutoff,)).fetchone()
    return RetentionPlan(cutoff, conversations, messages, events)


def prune_batch(conn: sqlite3.Connection, cutoff: float, max_conversations: int = 50) -> int:
    """Delete the oldest conversations last updated before ``cutoff``, at most ``max_conversations`` (and
    about ``MAX_BATCH_MESSAGES`` messages), with their messages and events, in one transaction of its own.

    Returns how many conversations it deleted: 0 when nothing older than the cutoff is left.
    """
    return prune_batch_counts(conn, cutoff, max_conversations).conversations


def prune_batch_counts(conn: sqlite3.Connection, cutoff: float, max_conversations: int = 50) -> Pruned:
    """``prune_batch``, telling the messages and events deleted too."""
    if max_conversations < 1:
        raise ValueError("max_conversations must be at least 1")
    with immediate(conn):
        size = messages = 0
        for (count,) in conn.execute(OLDEST, (cutoff, max_conversations)).fetchall():
            if size and messages + count > MAX_BATCH_MESSAGES:
                break
            size += 1
            messages += count
        if not size:
            return Pruned()  # committed on the way out: nothing was changed
        # Events carry no foreign key, and messages are deleted explicitly too: the result is the same
        # whether or not this connection enforces foreign keys (the cascade then finds nothing left).
        # Conversations go last: until then, the batch's selection is unchanged.
        events = conn.execute(DELETE_EVENTS, (cutoff, size)).rowcount
        conn.execute(UNINDEX_MESSAGES, (cutoff, size))  # before the messages: it reads their text
        deleted_messages = conn.execute(DELETE_MESSAGES, (cutoff, size)).rowcount
        conversations = conn.execute(DELETE_CONVERSATIONS, (cutoff, size)).rowcount
    return Pruned(conversations, deleted_messages, events)
