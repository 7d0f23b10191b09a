"""Erasure on PostgreSQL: the same functions, answers and rows as storage.erasure, safe against writes
racing it.

Ordering against the writers. An erasure takes the conversation's row lock the way every writer does,
with the same upsert (``LOCK_FOR_ERASURE``), so a write and an erasure of one conversation queue:

- a write that holds the lock first commits first, and the erasure then deletes what it wrote;
- a write that comes second finds the tombstone. If the erasure already deleted the row, the write's
  upsert inserts it again (its conflict went away with the erasure's commit, but the tombstone check was
  read before): storage.postgres.writes checks the tombstones once more for every conversation it
  created, under the lock, where the erasure's commit is visible, and drops those deliveries.
- a conversation another replica is creating right now (its row not committed) makes the upsert wait on
  that insert, then erase it: a plain ``SELECT ... FOR UPDATE`` would not see it, and would not wait.

If the erasure finds no row, the upsert leaves a placeholder, deleted at once in the same transaction
(nobody sees it); it counts as nothing erased.

The search index is the GIN index over the messages: the server drops their entries with the rows, so
``search_entries`` is the number of messages. SQLite's ``secure_delete`` has no counterpart: PostgreSQL
leaves a deleted row's bytes in its page until VACUUM reuses the space (autovacuum does it in time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from storage.erasure import Erased, Tombstone, leave_tombstone
from storage.postgres import outbox, retries
from storage.postgres import statements as sql
from storage.postgres.connection import Connection

__all__ = ["ERASED", "Erased", "Tombstone", "count_dropped", "erase", "tombstone", "tombstoned", "undo"]

# The writers' lock (storage.postgres.statements.LOCK_CONVERSATIONS) for one conversation, tombstone or not.
# ``xmax = 0``: no row was there, this is the placeholder.
LOCK_FOR_ERASURE = """
INSERT INTO conversations (id, source, created_at, updated_at) VALUES (%s, '', %s, %s)
ON CONFLICT (id) DO UPDATE SET rev = nextval('conversation_revs')
RETURNING xmax = 0
"""

# (what, statement): every table holding a conversation's data, by conversation id. The conversation row
# goes last; messages are deleted explicitly (their foreign key to the conversation does not cascade).
ERASED: tuple[tuple[str, str], ...] = (
    ("messages", "DELETE FROM messages WHERE conversation_id = %s"),
    ("events", "DELETE FROM events WHERE conversation_id = %s"),
    ("dead_letters", "DELETE FROM dead_letters WHERE conversation_id = %s"),
    ("conversations", "DELETE FROM conversations WHERE id = %s"),
)

# A second erasure of the same id keeps the first deletion time and the count of drops since.
TOMBSTONE = "INSERT INTO tombstones (conversation_id, deleted_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"
TOMBSTONED = "SELECT conversation_id FROM tombstones WHERE conversation_id = ANY(%b::text[])"


def erase(conn: Connection, conversation_id: str, *, now: float | None = None) -> Erased | None:
    """Delete everything of ``conversation_id`` and leave its tombstone, in one transaction (run again
    whole after a deadlock). None (and nothing changed) when the database holds nothing of it. ``conn``
    has no transaction open."""
    deleted_at = time.time() if now is None else now
    return retries.in_transaction(conn, lambda: _erase(conn, conversation_id, deleted_at))


def _erase(conn: Connection, conversation_id: str, deleted_at: float) -> Erased | None:
    locked = conn.execute(LOCK_FOR_ERASURE, (conversation_id, deleted_at, deleted_at)).fetchone()
    if locked is not None and locked[0]:
        conn.execute("DELETE FROM conversations WHERE id = %s", (conversation_id,))
    source = outbox.erased_source(conn, conversation_id)
    counts = {what: conn.execute(statement, (conversation_id,)).rowcount for what, statement in ERASED}
    found = Erased(conversation_id, **counts, deleted_at=deleted_at, search_entries=counts["messages"])
    return leave_tombstone(
        conn.execute,
        found,
        TOMBSTONE,
        outbox.DELETE_CHANGES,
        source,
        lambda source: outbox.record_erased(conn, conversation_id, source, deleted_at),
    )


def undo(conn: Connection, conversation_id: str) -> Tombstone | None:
    """Lift the tombstone of ``conversation_id``, so its next delivery is stored; the lifted tombstone,
    or None if it had none. What the erasure deleted stays deleted."""
    with conn.transaction():
        row = conn.execute(
            "DELETE FROM tombstones WHERE conversation_id = %s"
            " RETURNING conversation_id, deleted_at, dropped, last_dropped_at",
            (conversation_id,),
        ).fetchone()
    return None if row is None else Tombstone(*row)


def tombstone(conn: Connection, conversation_id: str) -> Tombstone | None:
    row = conn.execute(
        "SELECT conversation_id, deleted_at, dropped, last_dropped_at FROM tombstones WHERE conversation_id = %s",
        (conversation_id,),
    ).fetchone()
    return None if row is None else Tombstone(*row)


def tombstoned(conn: Connection, conversation_ids: Iterable[str]) -> set[str]:
    """Which of ``conversation_ids`` were erased: one query for a whole batch, on the tombstones' key."""
    ids = list(dict.fromkeys(conversation_ids))
    if not ids:
        return set()
    return {row[0] for row in conn.execute(TOMBSTONED, (ids,)).fetchall()}


def count_dropped(conn: Connection, dropped: Mapping[str, int], at: float) -> None:
    """Add the deliveries dropped for each erased conversation to its tombstone, in the open transaction."""
    if dropped:
        ids = sorted(dropped)  # the one lock order
        conn.execute(sql.COUNT_DROPPED, (at, ids, [dropped[cid] for cid in ids]))
