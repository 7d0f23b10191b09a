"""The writer thread's side of PostgreSQL: one connection, reconnected when the server comes back.

A lost connection fails the batch in flight (its senders get 503 with Retry-After and send again; a commit
whose answer was lost is deduplicated by its delivery key), and the next batch or probe connects anew, so
the daemon recovers from a server restart without a restart of its own.

A connection idle while the server restarted only shows it is lost when it is next used: the batch or
probe that finds it so is tried once more on a new connection, so a replica idle through a restart
answers its next delivery 200 and its next readiness probe ready, not 503.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg

from storage.deliveries import Record
from storage.errors import StorageUnavailable
from storage.postgres import heartbeat
from storage.postgres.connection import Connection, Synchronous, connect, where
from storage.postgres.migrations import migrate
from storage.postgres.outbox import latest_position
from storage.postgres.writes import commit_batch
from storage.writes import Outcome

log = logging.getLogger("transcriptd.writer")


class PostgresEngine:
    def __init__(
        self, url: str, *, synchronous: Synchronous = "full", replica: str = "", busy_timeout_ms: int = 5000
    ) -> None:
        self.url = url
        self.replica = replica or "transcriptd"
        self._synchronous: Synchronous = synchronous
        # storage.busy_timeout_ms, as on SQLite: how long a write waits for a lock held elsewhere (another
        # session's long transaction, a LOCK TABLE) before it fails as a storage fault (503, Retry-After).
        # Unbounded, the writer thread would wait as long as the holder likes, and a stop with deliveries
        # queued would never end. 0 means "do not wait" on SQLite, "for ever" on PostgreSQL: 1 ms instead.
        self._lock_timeout = f"{max(1, busy_timeout_ms)}ms"
        self._conn: Connection | None = None

    def _connect(self) -> Connection:
        return connect(self.url, synchronous=self._synchronous, application_name=f"transcriptd {self.replica}")

    def _bound_lock_waits(self, conn: Connection) -> None:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (self._lock_timeout,))

    def open(self) -> None:
        conn = self._connect()
        try:
            # Migrations first, without the bound: replicas starting together wait on the migration lock
            # for as long as the first one takes to migrate.
            if applied := migrate(conn):
                log.info("applied migrations %s to %s", applied, where(self.url))
            self._bound_lock_waits(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def connection(self) -> Connection:
        """The connection, made anew if the last one was lost; ``StorageUnavailable`` while the server is
        unreachable."""
        return self._connection()[0]

    def _connection(self) -> tuple[Connection, bool]:
        """The connection, and whether it was made just now."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        if conn is not None:
            conn.close()
            self._conn = None
        conn = self._connect()
        try:
            self._bound_lock_waits(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StorageUnavailable(f"storage is unavailable: {exc}") from exc
        self._conn = conn
        log.info("reconnected to PostgreSQL at %s", where(self.url))
        return conn, True

    def commit(self, batch: Sequence[Record], *, record_changes: bool) -> tuple[list[Outcome], int | None]:
        conn, new = self._connection()
        try:
            return commit_batch(conn, batch, record_changes=record_changes)
        except StorageUnavailable:
            if new or not conn.broken:
                raise
        # Found lost on first use (the server restarted since): written again on a new connection. Safe
        # whatever the lost attempt did: had its COMMIT gone through, each delivery's key makes this
        # attempt store nothing again (its senders are answered "duplicate", their data stored).
        log.info("the connection to %s was lost since its last use; writing the batch on a new one", where(self.url))
        return commit_batch(self.connection(), batch, record_changes=record_changes)

    def probe(self) -> str | None:
        try:
            conn, new = self._connection()
            problem = heartbeat.probe(conn, self.replica)
            if problem is not None and not new and conn.broken:
                problem = heartbeat.probe(self.connection(), self.replica)  # lost while idle: once more
        except StorageUnavailable as exc:
            return str(exc)
        return problem

    def latest_position(self) -> int:
        return latest_position(self.connection())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
