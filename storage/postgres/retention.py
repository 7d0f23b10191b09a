"""Retention on PostgreSQL: storage/retention.py's functions, safe with several replicas pruning at once.

A batch is chosen with ``FOR UPDATE SKIP LOCKED``: two replicas (or a replica and an operator's
``transcriptd prune``) running it together each take conversations the other has not locked, so none is
deleted twice and neither waits for the other. A conversation a writer holds (its group commit locks the
batch's conversations first, until commit) is skipped too: the prune never waits on a writer, so it can
never close a lock cycle with one. The conversation rows are the first locks the prune takes, as in every
writer; their messages and events are deleted under them.

The cutoff is checked again under the lock: a row locked after a writer committed is seen as that writer
left it, and a conversation a delivery refreshed a moment earlier is no longer old. A delivery arriving a
moment later waits on the lock, then finds no trace of the deleted conversation and starts afresh.

Deleted as on SQLite: the conversations, their messages and their raw events; dead letters, tombstones
and recorded changes stay. The search index (an expression index over ``messages``) follows the rows.
"""

from __future__ import annotations

from storage.postgres.connection import Connection
from storage.retention import MAX_BATCH_MESSAGES, Pruned, RetentionPlan

PLAN = """
SELECT
    (SELECT count(*) FROM conversations WHERE updated_at < %(cutoff)s),
    (SELECT count(*) FROM messages
     WHERE conversation_id IN (SELECT id FROM conversations WHERE updated_at < %(cutoff)s)),
    (SELECT count(*) FROM events
     WHERE conversation_id IN (SELECT id FROM conversations WHERE updated_at < %(cutoff)s))
"""

# The oldest first, as SQLite's; rows another transaction holds are passed over, not waited for. Under
# READ COMMITTED, a row whose newer version committed while this statement ran is checked against the
# WHERE again before it is locked.
LOCK_OLDEST = """
SELECT id, message_count FROM conversations WHERE updated_at < %s
ORDER BY updated_at, id LIMIT %s
FOR UPDATE SKIP LOCKED
"""
DELETE_EVENTS = "DELETE FROM events WHERE conversation_id = ANY(%s::text[])"
DELETE_MESSAGES = "DELETE FROM messages WHERE conversation_id = ANY(%s::text[])"
# The cutoff once more: the batch's rows are locked, so this is what was checked, stated where it acts.
DELETE_CONVERSATIONS = "DELETE FROM conversations WHERE id = ANY(%s::text[]) AND updated_at < %s"


def plan(conn: Connection, cutoff: float) -> RetentionPlan:
    """Count the conversations last updated before ``cutoff`` (Unix seconds), their messages and events."""
    row = conn.execute(PLAN, {"cutoff": cutoff}).fetchone()
    assert row is not None
    conversations, messages, events = row
    return RetentionPlan(cutoff, conversations, messages, events)


def prune_batch(conn: Connection, cutoff: float, max_conversations: int = 50) -> int:
    """Delete the oldest conversations last updated before ``cutoff`` that no other transaction holds, at
    most ``max_conversations`` (and about ``MAX_BATCH_MESSAGES`` messages), with their messages and events,
    in one transaction of its own.

    Returns how many conversations it deleted: 0 when nothing older than the cutoff is left to this
    caller (another replica may be deleting the last ones)."""
    return prune_batch_counts(conn, cutoff, max_conversations).conversations


def prune_batch_counts(conn: Connection, cutoff: float, max_conversations: int = 50) -> Pruned:
    """``prune_batch``, telling the messages and events deleted too."""
    if max_conversations < 1:
        raise ValueError("max_conversations must be at least 1")
    with conn.transaction():
        ids: list[str] = []
        messages = 0
        for cid, count in conn.execute(LOCK_OLDEST, (cutoff, max_conversations)).fetchall():
            if ids and messages + count > MAX_BATCH_MESSAGES:
                break  # the rows locked past here are let go at commit, for the next batch
            ids.append(cid)
            messages += count
        if not ids:
            return Pruned()
        events = conn.execute(DELETE_EVENTS, (ids,)).rowcount
        deleted_messages = conn.execute(DELETE_MESSAGES, (ids,)).rowcount
        conversations = conn.execute(DELETE_CONVERSATIONS, (ids, cutoff)).rowcount
    return Pruned(conversations, deleted_messages, events)
