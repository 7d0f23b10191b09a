"""Erasure: everything of one conversation goes in one transaction, and a tombstone stays behind.

``ERASED`` is the one list of what a conversation owns. Whatever is added later that holds a
conversation's data (a search index) gets its line here, and is erased with the
rest in the same transaction. The tombstone keeps a late re-delivery from bringing the conversation
back: the writer drops any delivery whose conversation has one (see ``tombstoned``), answers it 2xx
and stores nothing of it. The conversation's changes (storage.outbox) go too, and one change
``{"erased": 1}`` (status NULL) is recorded in their place, so that the app hears of the erasure; undoing
it records nothing (nothing comes back).

Both ``erase`` and ``undo`` take a connection in autocommit mode with no transaction open: the daemon's
writer connection (run as a writer job, between two commits) or an operator command's own.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from storage import outbox
from storage import statements as sql
from storage.connection import immediate
from storage.search_index import UNINDEX_CONVERSATION

# (what, statement): every table holding a conversation's data, by conversation id (?1). The conversation
# row goes last; messages are deleted explicitly, whether or not the connection enforces foreign keys.
ERASED: tuple[tuple[str, str], ...] = (
    ("search_entries", UNINDEX_CONVERSATION),  # first: it reads the text it removes from messages
    ("messages", "DELETE FROM messages WHERE conversation_id = ?1"),
    ("events", "DELETE FROM events WHERE conversation_id = ?1"),
    ("dead_letters", "DELETE FROM dead_letters WHERE conversation_id = ?1"),
    ("conversations", "DELETE FROM conversations WHERE id = ?1"),
)

# A second erasure of the same id keeps the first deletion time and the count of drops since.
TOMBSTONE = "INSERT INTO tombstones (conversation_id, deleted_at) VALUES (?, ?) ON CONFLICT DO NOTHING"

TOMBSTONED = "SELECT conversation_id FROM tombstones WHERE conversation_id IN ("
TOMBSTONED_TAIL = ")"

COUNT_DROPPED = """
UPDATE tombstones SET dropped = dropped + v.column2, last_dropped_at = v.column3
FROM ("""
COUNT_DROPPED_TAIL = ") AS v WHERE tombstones.conversation_id = v.column1"


@dataclass(frozen=True, slots=True)
class Erased:
    """What one erasure removed, table by table."""

    conversation_id: str
    messages: int
    events: int
    dead_letters: int
    conversations: int
    deleted_at: float
    changes: int = 0
    # The change the erasure recorded ({"erased": 1}), so that the app hears of it.
    position: int | None = None
    search_entries: int = 0  # the messages' entries in the search index

    @property
    def anything(self) -> bool:
        return bool(self.messages or self.events or self.dead_letters or self.conversations)


@dataclass(frozen=True, slots=True)
class Tombstone:
    conversation_id: str
    deleted_at: float
    dropped: int
    last_dropped_at: float | None


def erase(conn: sqlite3.Connection, conversation_id: str, *, now: float | None = None) -> Erased | None:
    """Delete everything of ``conversation_id`` and leave its tombstone, in one transaction. None (and
    nothing changed) when the database holds nothing of it."""
    deleted_at = time.time() if now is None else now
    # Deleted cells are overwritten with zeros, not just freed: otherwise the text stays in free pages of
    # the file until they are reused. Only for this transaction: it costs writes the hot path should not pay.
    (secure,) = conn.execute("PRAGMA secure_delete").fetchone()
    conn.execute("PRAGMA secure_delete = ON")
    try:
        with immediate(conn):
            source = outbox.erased_source(conn, conversation_id)
            counts = {what: conn.execute(statement, (conversation_id,)).rowcount for what, statement in ERASED}
            found = Erased(conversation_id, **counts, deleted_at=deleted_at)
            erased = leave_tombstone(
                conn.execute,
                found,
                TOMBSTONE,
                outbox.DELETE_CHANGES,
                source,
                lambda source: outbox.record_erased(conn, conversation_id, source, deleted_at),
            )
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(secure)}")
    return erased


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...


def leave_tombstone(
    execute: Callable[[str, tuple[Any, ...]], _Cursor],
    erased: Erased,
    tombstone: str,
    delete_changes: str,
    source: str | None,
    record_erased: Callable[[str], int],
) -> Erased | None:
    """The end of an erasure on either backend, once its rows are deleted (``erased`` counts them): its
    tombstone, its changes deleted and the erasure's own change recorded; None if nothing was there."""
    if not erased.anything:
        return None  # the caller's transaction commits on the way out: nothing was changed
    execute(tombstone, (erased.conversation_id, erased.deleted_at))
    # Its changes go, but only with its data: the change an earlier erasure left stays the only one.
    changes = execute(delete_changes, (erased.conversation_id,)).rowcount
    position = None
    if source is not None:  # it has data, so it has a source: this change tells the app it is gone
        position = record_erased(source)
    return dataclasses.replace(erased, changes=changes, position=position)


def undo(conn: sqlite3.Connection, conversation_id: str) -> Tombstone | None:
    """Lift the tombstone of ``conversation_id``, so its next delivery is stored; the lifted tombstone,
    or None if it had none. What the erasure deleted stays deleted."""
    with immediate(conn):
        found = tombstone(conn, conversation_id)
        if found is not None:
            conn.execute("DELETE FROM tombstones WHERE conversation_id = ?", (conversation_id,))
    return found


def tombstone(conn: sqlite3.Connection, conversation_id: str) -> Tombstone | None:
    row = conn.execute(
        "SELECT conversation_id, deleted_at, dropped, last_dropped_at FROM tombstones WHERE conversation_id = ?",
        (conversation_id,),
    ).fetchone()
    return None if row is None else Tombstone(*row)


def tombstoned(conn: sqlite3.Connection, conversation_ids: Iterable[str]) -> set[str]:
    """Which of ``conversation_ids`` were erased: one query (per 512 ids) for a whole batch, inside the
    writer's transaction, on the tombstones' primary key."""
    ids = [(cid,) for cid in dict.fromkeys(conversation_ids)]
    if not ids:
        return set()
    return {row[0] for row in sql.select_rows(conn, TOMBSTONED, ids, TOMBSTONED_TAIL)}


def count_dropped(conn: sqlite3.Connection, dropped: Mapping[str, int], at: float) -> None:
    """Add the deliveries dropped for each erased conversation to its tombstone, in the open transaction."""
    if dropped:
        sql.insert_rows(conn, COUNT_DROPPED, [(cid, n, at) for cid, n in dropped.items()], COUNT_DROPPED_TAIL)
