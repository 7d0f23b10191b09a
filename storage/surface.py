"""The storage surface the daemon calls, the same on every backend: which module to call is chosen once,
here, from the storage target (a SQLite path or a ``postgresql://`` URL).

Each backend has the same modules with the same functions (``storage.retention`` and
``storage.postgres.retention``, ...), each taking that backend's own connection: the writer's, through
``Writer.run_job``, or a reading one from ``read_connection``. The protocols below name what the daemon uses,
so mypy checks both backends' modules against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from storage.backend import describe, is_postgres_url

if TYPE_CHECKING:
    from storage import search as fts
    from storage.erasure import Erased, Tombstone
    from storage.notifications import Attempted, Due, Pending
    from storage.queries import Conversation, ConversationFilter, ConversationSummary, Message, PostCallAction
    from storage.retention import Pruned, RetentionPlan
    from storage.search_index import State


class Reads(Protocol):
    """The API's reads (storage.queries.Reader, storage.postgres.queries.Reader)."""

    # True where other processes write the same database (PostgreSQL replicas): a cached page is served
    # only while the conversation's ``rev`` is the one it was cached at.
    shared: bool

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def rev(self, conversation_id: str) -> int | None: ...
    async def conversation(self, conversation_id: str) -> Conversation | None: ...
    async def post_call_actions(self, conversation_id: str) -> list[PostCallAction]: ...
    async def conversations(
        self, limit: int, before: tuple[float, str] | None, where: ConversationFilter | None = None
    ) -> list[ConversationSummary]: ...
    async def has_role(self, conversation_id: str, role: str) -> bool: ...
    async def messages(
        self,
        conversation_id: str,
        *,
        source: str,
        limit: int,
        after: int | None = None,
        offset: int = 0,
        role: str | None = None,
        include_system: bool = False,
    ) -> list[Message]: ...
    async def changes(self, after: int, limit: int) -> list[tuple[Any, ...]]: ...
    async def search(self, query: fts.SearchQuery) -> fts.SearchPage: ...
    async def timeline(
        self, conversation_id: str, *, limit: int, after: tuple[float, int, int] | None, bodies: bool
    ) -> list[tuple[Any, ...]]: ...
    async def event_body(self, conversation_id: str, kind: int, row_id: int) -> bytes | None: ...


# The storage modules' functions, generic in the backend's connection type: Surface holds them as
# Protocol[Any] (the daemon passes each the connection its own backend made), and the operator commands'
# Database (daemon.operator_db) as Protocol[its connection].
Conn = TypeVar("Conn", contravariant=True)


class Retention(Protocol[Conn]):
    def plan(self, conn: Conn, cutoff: float) -> RetentionPlan: ...
    def prune_batch(self, conn: Conn, cutoff: float, max_conversations: int = 50) -> int: ...
    def prune_batch_counts(self, conn: Conn, cutoff: float, max_conversations: int = 50) -> Pruned: ...


class Erasure(Protocol[Conn]):
    def erase(self, conn: Conn, conversation_id: str, *, now: float | None = None) -> Erased | None: ...
    def undo(self, conn: Conn, conversation_id: str) -> Tombstone | None: ...
    def tombstone(self, conn: Conn, conversation_id: str) -> Tombstone | None: ...
    def tombstoned(self, conn: Conn, conversation_ids: Iterable[str]) -> set[str]: ...
    def count_dropped(self, conn: Conn, dropped: Mapping[str, int], at: float) -> None: ...


class SearchIndex(Protocol[Conn]):
    def state(self, conn: Conn) -> State: ...
    def step(self, conn: Conn, chunk: int = ...) -> int: ...
    def configure(self, conn: Conn, *, enabled: bool) -> bool: ...
    def rebuild(self, conn: Conn) -> None: ...


class Notifications(Protocol[Conn]):
    def settle_and_take_in(
        self, attempted: Sequence[Attempted], receivers: Iterable[str], now: float, limit: int, conn: Conn
    ) -> bool: ...
    def due(self, conn: Conn, receiver: str, now: float, limit: int) -> list[Due]: ...
    def pending_stats(self, conn: Conn, receiver: str) -> tuple[int, float | None]: ...
    def undelivered(self, conn: Conn, *, failed_only: bool = False, limit: int = 10_000) -> list[Pending]: ...
    def retry(self, conn: Conn, now: float, position: int | None = None) -> int: ...
    def oldest_change_at(self, conn: Conn) -> float | None: ...
    def prune(self, cutoff: float, receivers: Sequence[str], conn: Conn, limit: int = 1000) -> int: ...


class Lead(Protocol):
    """Whether this process may do the work only one may do at a time (storage.postgres.leader.Leader)."""

    def leads(self) -> bool: ...
    def close(self) -> None: ...


class _Alone:
    """SQLite: one process writes the file, so it always leads."""

    def leads(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Surface:
    target: str  # the SQLite path or the postgresql:// URL
    postgres: bool
    retention: Retention[Any]
    erasure: Erasure[Any]
    search_index: SearchIndex[Any]
    notifications: Notifications[Any]

    @property
    def driver_errors(self) -> tuple[type[Exception], ...]:
        """What the driver raises when the storage fails a statement (caught as a 503, never a 4xx)."""
        if self.postgres:
            import psycopg

            return (psycopg.Error,)
        import sqlite3

        return (sqlite3.Error,)

    @property
    def where(self) -> str:
        """The target for messages: a path, or host:port/dbname (never a password)."""
        return describe(self.target)

    def reader(self, *, connections: int = 2) -> Reads:
        if self.postgres:
            from storage.postgres.queries import Reader as PostgresReader

            return PostgresReader(self.target, connections=connections)
        from storage.queries import Reader

        return Reader(self.target, connections=connections)

    def leader(self) -> Lead:
        """Blocking calls (a round trip on PostgreSQL): call ``leads`` from a worker thread."""
        if self.postgres:
            from storage.postgres.leader import Leader

            return Leader(self.target)
        return _Alone()

    def read_connection(self, *, busy_timeout_ms: int = 5000) -> Any:
        """A connection of its own for reads off the event loop (the notifier's, the reconciler's)."""
        if self.postgres:
            from storage.postgres.connection import connect

            return connect(self.target, application_name="transcriptd reads")
        from storage.connection import open_reader

        return open_reader(self.target, busy_timeout_ms=busy_timeout_ms)


def surface_for(target: str) -> Surface:
    if is_postgres_url(target):
        from storage.postgres import erasure as pg_erasure
        from storage.postgres import notifications as pg_notifications
        from storage.postgres import retention as pg_retention
        from storage.postgres import search_index as pg_search_index

        return Surface(target, True, pg_retention, pg_erasure, pg_search_index, pg_notifications)
    from storage import erasure, notifications, retention, search_index

    return Surface(target, False, retention, erasure, search_index, notifications)
