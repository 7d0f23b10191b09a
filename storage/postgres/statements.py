"""SQL text of the PostgreSQL group commit: one set-based statement per table per batch.

Every statement takes whole columns as arrays (``unnest(%b::text[], ...)``): a batch is a few statements
whatever its size, each prepared once per connection (psycopg prepares a query after its fifth run), and
no statement text grows with the batch.
"""

from __future__ import annotations

from storage.deliveries import CHANGED_MESSAGE_COLUMNS, VENDOR_MESSAGE_COLUMNS
from storage.statements import MAX_METADATA_KEYS, PATCH_COLUMNS

# The first statement of every write transaction: the batch's conversations, sorted by id, inserted or
# locked, their rev bumped. Every writer locks its conversations in this one order before touching
# anything else, so two batches sharing conversations queue instead of deadlocking, and what a writer does
# under the lock (claiming keys, numbering appends) follows commit order per conversation. An erased
# conversation (it has a tombstone) is left out: the ids missing from RETURNING are the erased ones.
# ``xmax = 0``: the row was inserted by this statement, not found.
LOCK_CONVERSATIONS = """
INSERT INTO conversations (id, source, created_at, updated_at)
SELECT v.id, v.source, v.at, v.at
FROM unnest(%b::text[], %b::text[], %b::float8[]) AS v (id, source, at)
WHERE NOT EXISTS (SELECT 1 FROM tombstones AS t WHERE t.conversation_id = v.id)
ORDER BY v.id COLLATE "C"
ON CONFLICT (id) DO UPDATE SET rev = nextval('conversation_revs')
RETURNING id, xmax = 0
"""

# A conversation inserted by LOCK_CONVERSATIONS whose every delivery turned out to be stored already.
DROP_UNUSED_CONVERSATIONS = "DELETE FROM conversations WHERE id = ANY(%b::text[]) AND message_count = 0"

COUNT_DROPPED = """
UPDATE tombstones AS t SET dropped = t.dropped + v.n, last_dropped_at = %s
FROM unnest(%b::text[], %b::int8[]) AS v (id, n)
WHERE t.conversation_id = v.id
"""

# The claim: the returned keys are the deliveries this transaction stored first, whichever replica
# tries the same key at the same time (the second waits on the first's index entry, then skips it).
CLAIM_EVENTS = """
INSERT INTO events (delivery_key, source, event_type, conversation_id, received_at, body, problems)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], %b::bytea[], %b::int4[])
ON CONFLICT (delivery_key) DO NOTHING
RETURNING delivery_key
"""

FLOAT_PATCH_COLUMNS = frozenset({"started_at", "ended_at", "recording_duration"})
_PATCH_TYPES = ", ".join(f"%b::{'float8' if c in FLOAT_PATCH_COLUMNS else 'text'}[]" for c in PATCH_COLUMNS)

# The fresh deliveries' changes, merged per conversation beforehand (one row per conversation: an UPDATE
# ... FROM matching a row twice would apply only one of them). 'ended' and 'failed' are sticky, a column
# keeps its value unless the batch sets one, metadata merges key by key (merged_metadata, migration 0005),
# and updated_at never goes back in time.
PATCH_CONVERSATIONS = f"""
UPDATE conversations AS c SET
    status = CASE
        WHEN 'failed' IN (c.status, v.status) THEN 'failed'
        WHEN 'ended' IN (c.status, v.status) THEN 'ended'
        ELSE 'active' END,
    {", ".join(f"{col} = coalesce(v.{col}, c.{col})" for col in PATCH_COLUMNS)},
    metadata = CASE WHEN v.metadata IS NULL THEN c.metadata
                    ELSE merged_metadata(c.metadata, v.metadata, {MAX_METADATA_KEYS}) END,
    updated_at = greatest(c.updated_at, v.updated_at)
FROM unnest(%b::text[], %b::text[], {_PATCH_TYPES}, %b::jsonb[], %b::float8[])
    AS v (id, status, {", ".join(PATCH_COLUMNS)}, metadata, updated_at)
WHERE c.id = v.id
"""  # noqa: S608 (built from constants only)

# Each message column's type: the rows of both shapes go in as arrays of the vendor shape's columns
# (storage.deliveries.VENDOR_MESSAGE_COLUMNS), a plain row's vendor role NULL.
REAL_MESSAGE_COLUMNS = frozenset({"timestamp", "seconds_from_start", "duration", "created_at"})
MESSAGE_TYPES = {
    name: "int8" if name == "seq" else "float8" if name in REAL_MESSAGE_COLUMNS else "text"
    for name in VENDOR_MESSAGE_COLUMNS
}


def _arrays(columns: tuple[str, ...]) -> str:
    return ", ".join(f"%b::{MESSAGE_TYPES[name]}[]" for name in columns)


# A position already stored (a re-delivery, or the same position twice in the batch) is skipped; the
# returned keys are the rows inserted, attributed to deliveries afterwards.
INSERT_MESSAGES = f"""
INSERT INTO messages ({", ".join(VENDOR_MESSAGE_COLUMNS)})
SELECT * FROM unnest({_arrays(VENDOR_MESSAGE_COLUMNS)})
ON CONFLICT DO NOTHING
RETURNING conversation_id, source, seq
"""  # noqa: S608 (built from constants only)

# Only for rows that were already there: rewrite the positions whose entry changed. Each position at most
# once per statement (the caller splits repeats into rounds): an UPDATE applies one source row per target.
# Bound to the arrays of CHANGED_MESSAGE_COLUMNS: the key (conversation_id, source, seq), then the rest.
_KEY = ("conversation_id", "source", "seq")
_CHANGED = [name for name in CHANGED_MESSAGE_COLUMNS if name not in _KEY]
UPDATE_CHANGED_MESSAGES = f"""
UPDATE messages AS m SET
    {", ".join(f"{name} = v.{name}" for name in _CHANGED)}
FROM unnest({_arrays(CHANGED_MESSAGE_COLUMNS)})
    AS v ({", ".join(CHANGED_MESSAGE_COLUMNS)})
WHERE m.conversation_id = v.conversation_id AND m.source = v.source AND m.seq = v.seq
  AND ({", ".join(f"m.{name}" for name in _CHANGED)})
      IS DISTINCT FROM
      ({", ".join(f"v.{name}" for name in _CHANGED)})
RETURNING m.conversation_id, m.source, m.seq
"""  # noqa: S608 (built from constants only)

# The generic endpoint's appends, one row per statement (pipelined): the position is the stream's last
# one plus one, read under the conversation's row lock (LOCK_CONVERSATIONS), so appends from two replicas
# to one conversation queue and stay gapless. A client id seen before hits the unique index and is skipped
# without using up a position.
APPEND_MESSAGE = """
INSERT INTO messages (conversation_id, source, seq, role, content, timestamp, external_id, created_at)
SELECT %(cid)s, %(source)s,
       (SELECT coalesce(max(seq) + 1, 0) FROM messages WHERE conversation_id = %(cid)s AND source = %(source)s),
       %(role)s, %(content)s, %(timestamp)s::float8, %(external_id)s, %(created_at)s::float8
ON CONFLICT DO NOTHING
RETURNING seq
"""

# A client re-sending its message by id replaces it; a timestamp it leaves out is kept.
UPDATE_CHANGED_BY_EXTERNAL_ID = """
UPDATE messages SET role = %(role)s, content = %(content)s, timestamp = coalesce(%(timestamp)s::float8, timestamp)
WHERE conversation_id = %(cid)s AND external_id = %(external_id)s AND source = %(source)s
  AND (role, content, timestamp) IS DISTINCT FROM (%(role)s, %(content)s, coalesce(%(timestamp)s::float8, timestamp))
RETURNING seq
"""

# last_message_at as SQLite's writer sets it: max(coalesce(last, v), v) there is NULL when v is NULL
# (SQLite's multi-argument max), and the two backends must store the same rows.
COUNT_MESSAGES = """
UPDATE conversations AS c SET
    message_count = c.message_count + v.n,
    last_message_at = CASE WHEN v.last IS NULL THEN NULL
                           ELSE greatest(coalesce(c.last_message_at, v.last), v.last) END
FROM unnest(%b::text[], %b::int8[], %b::float8[]) AS v (id, n, last)
WHERE c.id = v.id
"""

# A delivery refused again while unresolved (the sender retries) keeps one row: attempts go up.
DEAD_LETTER = """
INSERT INTO dead_letters (delivery_key, source, event_type, conversation_id, received_at, body, error, failed_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (delivery_key) WHERE resolved_at IS NULL DO UPDATE SET
    attempts = dead_letters.attempts + 1, error = excluded.error, failed_at = excluded.failed_at,
    received_at = excluded.received_at, body = excluded.body
"""
