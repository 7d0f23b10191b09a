"""The SQL of a group commit, run in the writer's thread: one transaction for many deliveries."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from storage.deliveries import ConversationPatch, Delivery, WriteResult
from storage.errors import StorageRejected

log = logging.getLogger("transcriptd.storage")

INSERT_EVENT = """
INSERT INTO events (delivery_key, source, event_type, conversation_id, received_at, body)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (delivery_key) DO NOTHING
"""

_PATCH_COLUMNS = (
    "replica_id",
    "shutdown_reason",
    "started_at",
    "ended_at",
    "recording_uri",
    "recording_provider",
    "recording_duration",
    "recording_error",
    "perception_analysis",
    "perception_unavailable_reason",
)

# An event changes only the columns it knows; 'ended' is sticky because events arrive in any order.
# Built from the constant column list above, never from input.
UPSERT_CONVERSATION = f"""
INSERT INTO conversations (id, source, status, {", ".join(_PATCH_COLUMNS)}, created_at, updated_at)
VALUES (?, ?, coalesce(?, 'active'), {", ".join("?" for _ in _PATCH_COLUMNS)}, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    status = CASE WHEN conversations.status = 'ended' OR excluded.status = 'ended'
                  THEN 'ended' ELSE 'active' END,
    {", ".join(f"{c} = coalesce(excluded.{c}, conversations.{c})" for c in _PATCH_COLUMNS)},
    updated_at = excluded.updated_at
"""  # noqa: S608

INSERT_MESSAGE = """
INSERT INTO messages (conversation_id, seq, role, content, timestamp, seconds_from_start, duration,
                      inference_id, external_id, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

# Only on a re-delivery (some rows were already there): rewrite the positions whose entry changed.
UPDATE_CHANGED_MESSAGE = """
UPDATE messages
SET role = ?3, content = ?4, timestamp = ?5, seconds_from_start = ?6, duration = ?7, inference_id = ?8
WHERE conversation_id = ?1 AND seq = ?2
  AND (role IS NOT ?3 OR content IS NOT ?4 OR timestamp IS NOT ?5 OR seconds_from_start IS NOT ?6
       OR duration IS NOT ?7 OR inference_id IS NOT ?8)
"""

# The position is computed per row inside the statement, so executemany still appends in order; a
# client id seen before hits the unique index and is skipped without using up a position.
APPEND_MESSAGE = """
INSERT INTO messages (conversation_id, seq, role, content, timestamp, external_id, created_at)
SELECT ?1, (SELECT coalesce(max(seq) + 1, 0) FROM messages WHERE conversation_id = ?1), ?2, ?3, ?4, ?5, ?6
WHERE true
ON CONFLICT DO NOTHING
"""

# A client re-sending its message by id replaces it; a timestamp it leaves out is kept.
UPDATE_CHANGED_BY_EXTERNAL_ID = """
UPDATE messages SET role = ?2, content = ?3, timestamp = coalesce(?4, timestamp)
WHERE conversation_id = ?1 AND external_id = ?5
  AND (role IS NOT ?2 OR content IS NOT ?3 OR coalesce(?4, timestamp) IS NOT timestamp)
"""

COUNT_MESSAGES = """
UPDATE conversations
SET message_count = message_count + ?2,
    last_message_at = max(coalesce(last_message_at, ?3), ?3)
WHERE id = ?1
"""


def _patch_params(delivery: Delivery) -> tuple[object, ...]:
    patch: ConversationPatch = delivery.patch
    return (
        delivery.conversation_id,
        delivery.source,
        patch.status,
        *[getattr(patch, column) for column in _PATCH_COLUMNS],
        delivery.received_at,
        delivery.received_at,
    )


def write_delivery(conn: sqlite3.Connection, delivery: Delivery) -> WriteResult:
    """Store one delivery inside the open transaction; a delivery seen before changes nothing."""
    cursor = conn.execute(
        INSERT_EVENT,
        (
            delivery.key,
            delivery.source,
            delivery.event_type,
            delivery.conversation_id,
            delivery.received_at,
            delivery.body,
        ),
    )
    if cursor.rowcount == 0:
        return WriteResult(delivery.received, 0, 0, delivery.rejected, duplicate_delivery=True)
    conn.execute(UPSERT_CONVERSATION, _patch_params(delivery))
    inserted = updated = 0
    if delivery.rows:
        inserted = conn.executemany(INSERT_MESSAGE, delivery.rows).rowcount
        if inserted < len(delivery.rows):
            updated = conn.executemany(UPDATE_CHANGED_MESSAGE, [row[:8] for row in delivery.rows]).rowcount
    if delivery.append_rows:
        appended = conn.executemany(APPEND_MESSAGE, delivery.append_rows).rowcount
        if appended < len(delivery.append_rows):
            with_ids = [row[:5] for row in delivery.append_rows if row[4] is not None]
            updated += conn.executemany(UPDATE_CHANGED_BY_EXTERNAL_ID, with_ids).rowcount
        inserted += appended
    if inserted:
        conn.execute(COUNT_MESSAGES, (delivery.conversation_id, inserted, delivery.last_message_at))
    return WriteResult(delivery.received, inserted, updated, delivery.rejected)


def write_batch(conn: sqlite3.Connection, batch: Sequence[Delivery]) -> list[WriteResult | StorageRejected]:
    """One transaction for the whole batch; a delivery whose rows the database refuses is rolled back
    to its savepoint and reported, and the others still commit.

    ``sqlite3.OperationalError`` (disk full, locked, read-only, I/O) is a fault of the storage, not of
    a delivery: it propagates, the transaction is rolled back, and nothing of the batch is stored.
    """
    outcomes: list[WriteResult | StorageRejected] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for delivery in batch:
            conn.execute("SAVEPOINT delivery")
            try:
                outcomes.append(write_delivery(conn, delivery))
            except sqlite3.OperationalError:
                raise
            except (sqlite3.DatabaseError, ValueError, OverflowError) as exc:
                # ValueError covers strings that cannot be encoded (lone surrogates) at bind time.
                conn.execute("ROLLBACK TO delivery")
                log.error("delivery rejected by the database: %s (%s)", exc.__class__.__name__, exc)
                outcomes.append(StorageRejected(f"the database rejected this delivery: {exc}"))
            conn.execute("RELEASE delivery")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes
