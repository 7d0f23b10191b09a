"""A backend's side of the writer thread: open and migrate, commit a batch, probe, reconnect.

``storage.writer.Writer`` forms batches and resolves deliveries the same way on every backend; an engine is
what differs. Only the writer thread calls an engine, so an engine needs no locking of its own.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from storage.backend import is_postgres_url
from storage.connection import Synchronous, immediate, open_writer
from storage.deliveries import Record
from storage.migrations import migrate
from storage.outbox import latest_position
from storage.writes import Outcome, commit_batch

log = logging.getLogger("transcriptd.writer")


class Engine(Protocol):
    def open(self) -> None:
        """Connect and migrate; raise (a ``StorageError`` or the driver's error) if the storage is unusable."""

    def connection(self) -> Any:
        """The writing connection, for a maintenance job (the backend's own module functions take it)."""

    def commit(self, batch: Sequence[Record], *, record_changes: bool) -> tuple[list[Outcome], int | None]:
        """Write ``batch`` in one transaction and commit: its outcomes, and the last change's position."""

    def probe(self) -> str | None:
        """Commit a heartbeat: None if the storage takes writes now, else why not."""

    def latest_position(self) -> int:
        """The outbox's highest position (0: none yet)."""

    def close(self) -> None: ...


class SqliteEngine:
    """One connection to the database file, for the life of the writer."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        cache_size_mib: int = 64,
        busy_timeout_ms: int = 5000,
        factory: type[sqlite3.Connection] = sqlite3.Connection,
    ) -> None:
        self.path = path
        self._synchronous: Synchronous = synchronous
        self._cache_size_mib = cache_size_mib
        self._busy_timeout_ms = busy_timeout_ms
        self._factory = factory
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        conn = open_writer(
            self.path,
            synchronous=self._synchronous,
            cache_size_mib=self._cache_size_mib,
            busy_timeout_ms=self._busy_timeout_ms,
            factory=self._factory,
        )
        try:
            if applied := migrate(conn):
                log.info("applied migrations %s to %s", applied, self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def connection(self) -> sqlite3.Connection:
        assert self._conn is not None, "the engine is not open"
        return self._conn

    def commit(self, batch: Sequence[Record], *, record_changes: bool) -> tuple[list[Outcome], int | None]:
        return commit_batch(self.connection(), batch, record_changes=record_changes)

    def probe(self) -> str | None:
        """A real commit of one tiny row: a full disk or a read-only file shows here, not only a lock."""
        try:
            with immediate(self.connection()):
                self.connection().execute(
                    "INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                    (time.time(),),
                )
        except sqlite3.Error as exc:
            return f"{exc.__class__.__name__}: {exc}"
        return None

    def latest_position(self) -> int:
        return latest_position(self.connection())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def engine_for(
    target: str | Path,
    *,
    synchronous: Synchronous = "full",
    cache_size_mib: int = 64,
    busy_timeout_ms: int = 5000,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
    replica: str = "",
) -> Engine:
    """The engine for a SQLite path or a ``postgresql://`` URL."""
    if is_postgres_url(str(target)):
        from storage.postgres.engine import PostgresEngine

        return PostgresEngine(str(target), synchronous=synchronous, replica=replica, busy_timeout_ms=busy_timeout_ms)
    return SqliteEngine(
        target, synchronous=synchronous, cache_size_mib=cache_size_mib, busy_timeout_ms=busy_timeout_ms, factory=factory
    )
