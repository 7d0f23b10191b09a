"""The search index's upkeep: indexing the messages a write inserts, filling it for messages stored before
it existed, and turning it off and on (``search.enabled``).

Every write keeps the index in its own transaction: storage.writes calls :func:`index_after` after each
insert (one ``INSERT ... SELECT`` per statement's rows) and :func:`reindex` after an update that changed
a message's text; erasure and retention run :data:`UNINDEX_CONVERSATION` before they delete messages. Not
triggers: FTS5 writes out its pending terms at every savepoint, and a trigger runs each row's insert as a
statement of its own, so every row became a segment to merge: measured 5x the CPU of indexing the same
rows in one statement (1.06 s against 0.22 s for 40,000 messages). (SQLite 3.40's FTS5 also failed a
trigger's delete with "no such table" right after another connection changed the schema.)

The migration that creates ``messages_fts`` leaves the messages already stored as a range of ids to
index (the ``search_backfill`` row); the writes skip that range and index everything else. ``step``
indexes the next chunk of the range in one short transaction and moves the range on; once it is empty the
row goes, and the index is complete. The daemon runs the steps as writer jobs at start-up (between two
commits, so intake goes on), and ``transcriptd search rebuild`` runs them from the command line with
progress on the terminal. Until the row is gone a search says ``partial``: what it finds is right, but
older messages may be missing.

Off (``search.enabled = false``): the range covers every id, so the writes index nothing, and the index
is emptied. On again: the range becomes every id stored, and the backfill fills it as after the migration.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from storage.connection import immediate
from storage.search import FTS_TABLE

MIN_ID = -(2**63)
MAX_ID = 2**63 - 1
# One step's transaction: long enough to be efficient, short enough not to hold deliveries up for long
# (measured: 40,000 messages of 4 to 40 words indexed in 0.22 s of CPU, one statement per 1,000).
CHUNK = 4000


def last_id(conn: sqlite3.Connection) -> int:
    """The highest message id now: what a write inserts next comes after it (rowids only grow past the
    largest), so ``index_after(conn, last_id)`` indexes exactly the rows inserted in between."""
    (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
    return int(last)


def index_after(conn: sqlite3.Connection, after_id: int) -> None:
    """Index the messages with an id above ``after_id`` (just inserted, in the open transaction), except those
    the backfill will index, and none while search is off."""
    row = conn.execute("SELECT next_id, last_id, disabled FROM search_backfill WHERE id = 1").fetchone()
    if row is None:
        conn.execute(INDEX_AFTER, (after_id,))
    elif not row[2]:
        conn.execute(INDEX_AFTER + " AND id NOT BETWEEN ? AND ?", (after_id, row[0], row[1]))


INDEX_AFTER = f"INSERT INTO {FTS_TABLE} (rowid, content) SELECT id, content FROM messages WHERE id > ?"  # noqa: S608

# Is message ``messages.id`` in the index (no backfill range covers it)?
INDEXED = "NOT EXISTS (SELECT 1 FROM search_backfill WHERE messages.id BETWEEN next_id AND last_id)"

# Before a conversation's messages are deleted (?1: its id): their entries go from the index. An external
# content index is told the old text, which is still in messages at this point.
UNINDEX_CONVERSATION = (
    f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, content) "  # noqa: S608
    f"SELECT 'delete', id, content FROM messages WHERE conversation_id = ?1 AND {INDEXED}"
)


def unindex_where(condition: str) -> str:
    """The statement removing from the index the messages that ``condition`` (SQL over ``messages``) names."""
    return (
        f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, content) "  # noqa: S608
        f"SELECT 'delete', id, content FROM messages WHERE ({condition}) AND {INDEXED}"
    )


def reindex(conn: sqlite3.Connection, changed: list[tuple[int, str]]) -> None:
    """After an update: each (id, text before) whose text changed leaves the index with its old text and
    comes back with its new one, unless the backfill has yet to index it."""
    pending = conn.execute("SELECT next_id, last_id, disabled FROM search_backfill WHERE id = 1").fetchone()
    if pending is not None:
        changed = [(rowid, old) for rowid, old in changed if not pending[2] and not pending[0] <= rowid <= pending[1]]
    if not changed:
        return
    conn.executemany(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, content) VALUES ('delete', ?, ?)", changed)  # noqa: S608
    conn.executemany(
        f"INSERT INTO {FTS_TABLE} (rowid, content) SELECT id, content FROM messages WHERE id = ?",  # noqa: S608
        [(rowid,) for rowid, _ in changed],
    )


@dataclass(frozen=True, slots=True)
class State:
    """Where the index stands: ``pending`` messages not indexed yet (0: complete), or off."""

    enabled: bool
    pending: int

    @property
    def complete(self) -> bool:
        return self.enabled and self.pending == 0


def state(conn: sqlite3.Connection) -> State:
    row = conn.execute("SELECT next_id, last_id, disabled FROM search_backfill WHERE id = 1").fetchone()
    if row is None:
        return State(enabled=True, pending=0)
    next_id, last_id, disabled = row
    if disabled:
        return State(enabled=False, pending=0)
    (pending,) = conn.execute("SELECT count(*) FROM messages WHERE id BETWEEN ? AND ?", (next_id, last_id)).fetchone()
    return State(enabled=True, pending=pending)


def step(conn: sqlite3.Connection, chunk: int = CHUNK) -> int:
    """Index the next ``chunk`` messages of the range, in one transaction; how many were indexed (0: the
    index is complete, or search is off). ``conn`` is in autocommit mode with no transaction open."""
    with immediate(conn):
        row = conn.execute("SELECT next_id, last_id, disabled FROM search_backfill WHERE id = 1").fetchone()
        if row is None or row[2]:
            return 0
        next_id, last_id, _ = row
        end = conn.execute(
            "SELECT id FROM messages WHERE id BETWEEN ? AND ? ORDER BY id LIMIT 1 OFFSET ?",
            (next_id, last_id, chunk - 1),
        ).fetchone()
        upto = last_id if end is None else end[0]
        indexed = conn.execute(
            f"INSERT INTO {FTS_TABLE} (rowid, content) SELECT id, content FROM messages WHERE id BETWEEN ? AND ?",  # noqa: S608
            (next_id, upto),
        ).rowcount
        if upto >= last_id:
            conn.execute("DELETE FROM search_backfill WHERE id = 1")
        else:
            conn.execute("UPDATE search_backfill SET next_id = ? WHERE id = 1", (upto + 1,))
    return indexed


def configure(conn: sqlite3.Connection, *, enabled: bool) -> bool:
    """Turn the index on or off as ``search.enabled`` says; True if that changed anything. Off empties it;
    on again leaves every message stored to the backfill."""
    with immediate(conn):
        row = conn.execute("SELECT disabled FROM search_backfill WHERE id = 1").fetchone()
        if enabled != bool(row and row[0]):
            return False  # already as asked
        conn.execute(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('delete-all')")  # noqa: S608
        if enabled:
            conn.execute("DELETE FROM search_backfill WHERE id = 1")
            conn.execute(
                "INSERT INTO search_backfill (id, next_id, last_id) SELECT 1, min(id), max(id) FROM messages "
                "HAVING count(*) > 0"
            )
        else:
            conn.execute(
                "INSERT INTO search_backfill (id, next_id, last_id, disabled) VALUES (1, ?, ?, 1) "
                "ON CONFLICT (id) DO UPDATE SET next_id = excluded.next_id, last_id = excluded.last_id, disabled = 1",
                (MIN_ID, MAX_ID),
            )
    return True


def rebuild(conn: sqlite3.Connection) -> None:
    """Start the index again from nothing (``transcriptd search rebuild --from-scratch``): every message
    stored goes back to the backfill."""
    with immediate(conn):
        conn.execute(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('delete-all')")  # noqa: S608
        conn.execute("DELETE FROM search_backfill WHERE id = 1")
        conn.execute(
            "INSERT INTO search_backfill (id, next_id, last_id) SELECT 1, min(id), max(id) FROM messages "
            "HAVING count(*) > 0"
        )
