"""The search index's upkeep on PostgreSQL: the same functions as storage.search_index, most of them with
nothing to do.

The index is the GIN index ``messages_search`` over ``search_document(content)`` (migration 0008). The
server keeps it in step with every insert, update and delete of a message in the writing transaction
itself, and ``CREATE INDEX`` indexed the messages stored before it. So the index is always complete:
``state`` says so, ``step`` indexes nothing, the write-time hooks (``index_after``, ``reindex``) and the
statements run before deletes (``unindex_where``) do nothing, and nothing needs a backfill range.

``search.enabled = false`` does not drop the index on PostgreSQL: ``configure`` leaves it as it is and
answers False (nothing changed); searches keep working. ``rebuild`` rebuilds it with ``REINDEX INDEX
CONCURRENTLY``, which lets writes go on meanwhile.
"""

from __future__ import annotations

from storage.postgres.connection import Connection
from storage.search_index import CHUNK, State

__all__ = [
    "CHUNK",
    "INDEX",
    "UNINDEX_CONVERSATION",
    "State",
    "configure",
    "index_after",
    "last_id",
    "rebuild",
    "reindex",
    "state",
    "step",
    "unindex_where",
]

INDEX = "messages_search"
# A statement that changes nothing, for callers that run ``unindex_where``'s before deleting messages.
NOTHING = "SELECT 0 WHERE false"
UNINDEX_CONVERSATION = NOTHING


def last_id(conn: Connection) -> int:
    """The highest message id now (0: none)."""
    row = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
    return 0 if row is None else int(row[0])


def index_after(conn: Connection, after_id: int) -> None:
    """Nothing: the server indexed the rows as they went in."""


def reindex(conn: Connection, changed: list[tuple[int, str]]) -> None:
    """Nothing: the server re-indexed the rows as they were updated."""


def unindex_where(condition: str) -> str:
    """A statement that does nothing: the server drops the entries of the messages deleted."""
    return NOTHING


def state(conn: Connection) -> State:
    """Always complete (see the module's docstring)."""
    return State(enabled=True, pending=0)


def step(conn: Connection, chunk: int = CHUNK) -> int:
    """Nothing to index: 0, the index is complete."""
    return 0


def configure(conn: Connection, *, enabled: bool) -> bool:
    """False: nothing changes. Off is not applied on PostgreSQL (the index stays, and searches work);
    on is how it always is."""
    return False


def rebuild(conn: Connection) -> None:
    """Rebuild the index from the messages stored (``transcriptd search rebuild --from-scratch``), without
    holding writes up. ``conn`` is in autocommit mode with no transaction open (REINDEX CONCURRENTLY cannot
    run in one)."""
    conn.execute(f"REINDEX INDEX CONCURRENTLY {INDEX}")
