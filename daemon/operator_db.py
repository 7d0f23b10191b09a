"""The database an operator command works on, whichever backend holds it: ``storage.url`` (or ``--db``;
``storage.path`` when empty) is a SQLite file, which must exist (an operator command never creates one), or
a ``postgresql://`` URL.

``opened`` is the one place that tells them apart. It yields a ``Database``: an open connection and the
storage modules of its backend, which mirror each other (same functions, same results), so a command
calls ``db.retention.plan(db.conn, cutoff)`` without knowing which it has.

A server that cannot be reached raises ``ServerUnreachable``, whose one line names ``host:port/dbname``,
never the user or password; ``label`` is how messages name the database, password-free as well.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from daemon.config import Config
from daemon.reconcile import Local, local_state
from storage import dead_letters, export, replay
from storage.connection import open_reader, open_writer
from storage.dead_letters import DeadLetter, RetrySummary
from storage.deliveries import Record, WriteResult
from storage.errors import StorageRejected
from storage.export import ConversationHead, Format
from storage.migrations import migrate as sqlite_migrate
from storage.postgres import dead_letters as pg_dead_letters
from storage.postgres import export as pg_export
from storage.postgres import replay as pg_replay
from storage.postgres.connection import Connection as PgConnection
from storage.postgres.connection import connect, is_postgres_url, where
from storage.postgres.migrations import migrate as pg_migrate
from storage.postgres.writes import write_batch as pg_write_batch
from storage.replay import Parse, ReplayLimits, ReplayStats, StoredEvent
from storage.surface import Conn, Erasure, Notifications, Retention, SearchIndex, surface_for
from storage.writes import write_batch as sqlite_write_batch

C = TypeVar("C")


class NoDatabase(Exception):
    """There is nothing to work on at the configured place; the message says why, in one line."""


# What the commands call of the storage modules the daemon does not (Retention, Erasure, Notifications and
# SearchIndex are storage.surface's), as both backends' modules provide it.
class Export(Protocol[Conn]):
    def conversation(self, conn: Conn, conversation_id: str) -> ConversationHead | None: ...
    def export(self, conn: Conn, head: ConversationHead, format: Format) -> Iterator[bytes]: ...


class Replay(Protocol[Conn]):
    def has_events(self, conn: Conn, conversation_id: str) -> bool: ...
    def replay(
        self,
        conn: Conn,
        parsers: Mapping[str, Parse],
        *,
        conversation_id: str | None = None,
        since: float | None = None,
        limits: ReplayLimits | None = None,
        on_failure: Callable[[StoredEvent, str], None] | None = None,
    ) -> ReplayStats: ...


class DeadLetters(Protocol[Conn]):
    def list_unresolved(self, conn: Conn) -> list[DeadLetter]: ...
    def retry(self, conn: Conn, parsers: Mapping[str, Parse], ids: Iterable[int] | None = None) -> RetrySummary: ...


@dataclass(frozen=True, slots=True)
class Database(Generic[C]):
    """An open connection and its backend's storage modules."""

    conn: C
    label: str  # the file's path, or host:port/dbname: for messages
    migrate: Callable[[C], list[int]]
    write_batch: Callable[[C, Sequence[Record]], list[WriteResult | StorageRejected]]
    retention: Retention[C]
    export: Export[C]
    replay: Replay[C]
    dead_letters: DeadLetters[C]
    local_state: Callable[[C, str, Iterable[str]], dict[str, Local]]  # reconcile's view of what is here
    erasure: Erasure[C]
    notifications: Notifications[C]
    search_index: SearchIndex[C]


@contextmanager
def opened(config: Config, *, reads_only: bool = False, migrates: bool = False) -> Iterator[Database[Any]]:
    """The configured database, open for the length of the block.

    ``reads_only``: on SQLite, a read-only connection (a command that only reads never takes the write
    lock). ``migrates``: the command migrates the schema itself, so a PostgreSQL schema without the
    tables is fine; otherwise it is ``NoDatabase``, as a missing SQLite file is."""
    location = config.storage.target
    if is_postgres_url(location):
        with _postgres(config, location, migrates=migrates) as db:
            yield db
        return
    if (problem := missing(config)) is not None:
        raise NoDatabase(problem)
    path = Path(location)
    conn = open_reader(path, busy_timeout_ms=config.storage.busy_timeout_ms) if reads_only else writer(config)
    # The modules the daemon calls too come from storage.surface: one choice of backend for both.
    surface = surface_for(location)
    with closing(conn):
        yield Database(
            conn,
            label=str(path),
            migrate=sqlite_migrate,
            write_batch=sqlite_write_batch,
            export=export,
            replay=replay,
            dead_letters=dead_letters,
            retention=surface.retention,
            erasure=surface.erasure,
            notifications=surface.notifications,
            search_index=surface.search_index,
            local_state=partial(local_state, erasure=surface.erasure),
        )


@contextmanager
def _postgres(config: Config, url: str, *, migrates: bool) -> Iterator[Database[PgConnection]]:
    with connect(url, synchronous=config.storage.synchronous, application_name="transcriptd-cli") as conn:
        if not migrates and not _has_schema(conn):
            raise NoDatabase(
                f"no transcriptd tables at PostgreSQL {where(url)} (transcriptd serve creates them; check the "
                "URL's database and search_path)"
            )
        surface = surface_for(url)
        yield Database(
            conn,
            label=f"PostgreSQL {where(url)}",
            migrate=pg_migrate,
            write_batch=pg_write_batch,
            export=pg_export,
            replay=pg_replay,
            dead_letters=pg_dead_letters,
            retention=surface.retention,
            erasure=surface.erasure,
            notifications=surface.notifications,
            search_index=surface.search_index,
            local_state=partial(local_state, erasure=surface.erasure),
        )


def _has_schema(conn: PgConnection) -> bool:
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    return bool(row and row[0])


def missing(config: Config) -> str | None:
    """Why there is no SQLite database to work on (one line), or None when the configured file is there."""
    path = Path(config.storage.target)
    return None if path.is_file() else f"no database at {path} (set --db, or storage.path in the config)"


def writer(config: Config) -> sqlite3.Connection:
    """A writing connection to the configured SQLite database, with the daemon's storage settings."""
    return open_writer(
        Path(config.storage.target),
        synchronous=config.storage.synchronous,
        cache_size_mib=config.storage.cache_size_mib,
        busy_timeout_ms=config.storage.busy_timeout_ms,
    )
