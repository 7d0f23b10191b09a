"""SQL text for the writer, and multi-row statements built from it.

The writer runs in a thread of the same process as the event loop. Python's ``executemany`` releases
and re-takes the GIL around every row, and each re-take can wait for the busy event loop: measured
here, a transcript insert ran ~40x slower beside a busy loop row by row than with one multi-row
statement per chunk. So rows go in as ``INSERT ... SELECT * FROM (VALUES (...), (...), ...)``, one
statement per chunk of up to 512 rows. A chunk is padded up to one of a few sizes (``padded``) with
rows the statement filters out, so that few statement texts are cached and prepared, and a commit of 31
deliveries is one statement per small table, not one per set bit of 31 (five).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from storage.deliveries import (
    APPEND_COLUMNS,
    CHANGED_APPEND_COLUMNS,
    CHANGED_MESSAGE_COLUMNS,
    MESSAGE_COLUMNS,
    VENDOR_MESSAGE_COLUMNS,
)

# Measured on the writer alone (ms of the messages insert per 32-transcript commit): 128 rows 8.1,
# 256 8.2, 512 8.6, 1024 9.1, 2048 11.0: a huge statement costs more per row. Beside the busy event loop
# fewer statements mean fewer GIL re-takes: 512 was as fast as 1024 and 2048 end to end, and faster than
# 256. 512 x 15 columns is far under SQLite's 32,766 parameters per statement (checked in multi_row).
MAX_CHUNK_ROWS = 512
MAX_PARAMETERS = 32_766

PATCH_COLUMNS = (
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
    "end_reason",
    "analysis",
)

EXISTING_KEYS = "SELECT delivery_key FROM events WHERE delivery_key IN ("
EXISTING_KEYS_TAIL = ")"

INSERT_EVENTS = "INSERT INTO events (delivery_key, source, event_type, conversation_id, received_at, body)"
# Only for the few deliveries stored in part (a 422 with `accepted`): the common insert above stays as it is.
MARK_PARTIAL_EVENTS = "UPDATE events SET problems = ? WHERE delivery_key = ?"

# An event changes only the columns it knows; 'ended' and 'failed' are sticky because events arrive in
# any order ('failed' wins: a call that never connected also gets its end-of-call event).
# Built from the constant column list above, never from input.
UPSERT_CONVERSATIONS = (
    f"INSERT INTO conversations (id, source, status, {', '.join(PATCH_COLUMNS)}, metadata, created_at, updated_at)"
)
# The most keys a conversation's metadata holds (daemon.metadata.MAX_KEYS): past it, a delivery's keys
# are not merged, whole, and what is kept stays as it was.
MAX_METADATA_KEYS = 32
UPSERT_CONVERSATIONS_TAIL = f"""
ON CONFLICT (id) DO UPDATE SET
    status = CASE
        WHEN 'failed' IN (conversations.status, excluded.status) THEN 'failed'
        WHEN 'ended' IN (conversations.status, excluded.status) THEN 'ended'
        ELSE 'active' END,
    {", ".join(f"{c} = coalesce(excluded.{c}, conversations.{c})" for c in PATCH_COLUMNS)},
    -- Merged key by key: a later value of a key replaces the earlier one, other keys stay.
    metadata = CASE
        WHEN excluded.metadata IS NULL THEN conversations.metadata
        WHEN conversations.metadata IS NULL THEN excluded.metadata
        WHEN (SELECT count(*) FROM json_each(json_patch(conversations.metadata, excluded.metadata)))
             > {MAX_METADATA_KEYS} THEN conversations.metadata
        ELSE json_patch(conversations.metadata, excluded.metadata)
    END,
    -- Never back in time: a replayed or retried old event must not make a live conversation look old
    -- to retention.
    updated_at = max(conversations.updated_at, excluded.updated_at)
"""  # noqa: S608 (built from constants only)


def numbered(sql: str, columns: tuple[str, ...]) -> str:
    """``sql`` with each ``{column}`` as the numbered parameter (``?N``) of its place in ``columns``: the
    statement binds the rows as they are, whatever order their declaration gives the columns."""
    return sql.format_map({name: f"?{i}" for i, name in enumerate(columns, 1)})


# The column lists of storage.deliveries' row shapes, as declared there.
INSERT_MESSAGES = f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)})"
# The same with the vendor's own role: for rows of storage.deliveries.VendorMessageRow.
INSERT_VENDOR_MESSAGES = f"INSERT INTO messages ({', '.join(VENDOR_MESSAGE_COLUMNS)})"
INSERT_MESSAGES_TAIL = "ON CONFLICT DO NOTHING"

# Only on a re-delivery (some rows were already there): rewrite the positions whose entry changed
# (the vendor role is NULL for a row without one). Bound to a row's CHANGED_MESSAGE_COLUMNS.
UPDATE_CHANGED_MESSAGE = numbered(
    """
UPDATE messages
SET role = {role}, content = {content}, timestamp = {timestamp}, seconds_from_start = {seconds_from_start},
    duration = {duration}, inference_id = {inference_id}, vendor_role = {vendor_role}
WHERE conversation_id = {conversation_id} AND source = {source} AND seq = {seq}
  AND (role IS NOT {role} OR content IS NOT {content} OR timestamp IS NOT {timestamp}
       OR seconds_from_start IS NOT {seconds_from_start} OR duration IS NOT {duration}
       OR inference_id IS NOT {inference_id} OR vendor_role IS NOT {vendor_role})
RETURNING seq
""",
    CHANGED_MESSAGE_COLUMNS,
)

# The position is computed per row inside the statement, so rows still append in order; a client id
# seen before hits the unique index and is skipped without using up a position. The generic endpoint
# carries a few messages per request, so row-by-row executemany is fine here. Bound to an AppendRow.
APPEND_MESSAGE = numbered(
    f"""
INSERT INTO messages (seq, {", ".join(APPEND_COLUMNS)})
SELECT (SELECT coalesce(max(seq) + 1, 0) FROM messages WHERE conversation_id = {{conversation_id}}
                                                         AND source = {{source}}),
       {", ".join(f"{{{name}}}" for name in APPEND_COLUMNS)}
WHERE true
ON CONFLICT DO NOTHING
RETURNING seq
""",  # noqa: S608 (built from constants only)
    APPEND_COLUMNS,
)

# A client re-sending its message by id replaces it; a timestamp it leaves out is kept. Bound to an
# AppendRow's CHANGED_APPEND_COLUMNS.
UPDATE_CHANGED_BY_EXTERNAL_ID = numbered(
    """
UPDATE messages SET role = {role}, content = {content}, timestamp = coalesce({timestamp}, timestamp)
WHERE conversation_id = {conversation_id} AND external_id = {external_id} AND source = {source}
  AND (role IS NOT {role} OR content IS NOT {content} OR coalesce({timestamp}, timestamp) IS NOT timestamp)
RETURNING seq
""",
    CHANGED_APPEND_COLUMNS,
)

COUNT_MESSAGES = """
UPDATE conversations
SET message_count = message_count + v.column2,
    last_message_at = max(coalesce(last_message_at, v.column3), v.column3)
FROM ("""
COUNT_MESSAGES_TAIL = ") AS v WHERE conversations.id = v.column1"


@functools.cache
def multi_row(head: str, width: int, rows: int, tail: str) -> str:
    """``head VALUES (?, ...), ... tail``; cached, and only ever asked for the sizes ``padded`` gives."""
    if width * rows > MAX_PARAMETERS:
        raise ValueError(f"{rows} rows of {width} columns is over SQLite's {MAX_PARAMETERS} parameters")
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([row] * rows)} {tail}"


# Rows that fill a chunk up to its statement's size hold this in every column: an int binds without a
# conversion, and no key the writer matches or inserts (all text) is ever equal to it.
PAD = 0
PAD_STEP = 64


def padded(count: int) -> int:
    """The statement size for a chunk of ``count`` rows: a power of two up to 64, then a multiple of 64.
    Fourteen shapes per statement to prepare and cache, one statement per chunk, at most 63 rows of
    padding."""
    if count <= PAD_STEP:
        return 1 << (count - 1).bit_length()
    return -(-count // PAD_STEP) * PAD_STEP


def chunks(count: int) -> list[tuple[int, int]]:
    """(start, size) pairs covering ``count`` rows, each at most ``MAX_CHUNK_ROWS``."""
    return [(start, min(MAX_CHUNK_ROWS, count - start)) for start in range(0, count, MAX_CHUNK_ROWS)]


def _params(rows: Sequence[Sequence[object]], start: int, size: int, width: int) -> list[object]:
    """The chunk's values, row after row, then the padding: flattened in C, on the writer thread that
    shares the GIL with the event loop. (Rows built for bulk writes hold NULL as NaN: see
    ``storage.deliveries.NULL``.)"""
    values = list(chain.from_iterable(rows[start : start + size]))
    values.extend([PAD] * (width * (padded(size) - size)))
    return values


def _executed(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str
) -> Iterator[sqlite3.Cursor]:
    """``head VALUES ... tail`` run over ``rows``, one padded statement per chunk: each chunk's cursor."""
    width = len(rows[0]) if rows else 0
    for start, size in chunks(len(rows)):
        yield conn.execute(multi_row(head, width, padded(size), tail), _params(rows, start, size, width))


def select_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str) -> list[Any]:
    """Run a query whose ``VALUES`` list holds ``rows`` (e.g. ``x IN (VALUES ...)``), chunk by chunk.
    Padding rows must match nothing: the query compares them with text."""
    return [found for cursor in _executed(conn, head, rows, tail) for found in cursor.fetchall()]


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str = "") -> int:
    """Run ``head`` (an INSERT's column list, or an UPDATE's ``FROM (``) over ``rows``, chunk by chunk,
    with the padding rows filtered out; the number of rows the statements changed."""
    filtered_head, filtered_tail = _filtering(head, tail)
    return sum(cursor.rowcount for cursor in _executed(conn, filtered_head, rows, filtered_tail))


def insert_rows_last_id(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str = "") -> int:
    """``insert_rows``, returning the rowid of the last row inserted (no extra statement: the cursor has it)."""
    filtered_head, filtered_tail = _filtering(head, tail)
    last = 0
    for cursor in _executed(conn, filtered_head, rows, filtered_tail):
        last = cursor.lastrowid or last
    return last


def insert_returning(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str, returning: str = "seq"
) -> list[Any]:
    """``insert_rows``, returning ``returning`` of each row the statements changed (not of skipped ones)."""
    filtered_head, filtered_tail = _filtering(head, tail)
    return select_rows(conn, filtered_head, rows, f"{filtered_tail} RETURNING {returning}")


@functools.cache
def _filtering(head: str, tail: str) -> tuple[str, str]:
    """``head SELECT * FROM (VALUES ...) WHERE column1 IS NOT PAD tail``: the first column is a key
    (text, never NULL), so only the padding goes; a NULL there still reaches its NOT NULL constraint."""
    return f"{head} SELECT * FROM (", f") WHERE column1 IS NOT {PAD} {tail}"  # noqa: S608 (constants only)
