"""The writer thread's side of PostgreSQL: one connection, reconnected when the server comes back.

A lost connection fails the batch in flight (its senders get 503 with Retry-After and send again; a commit
whose answer was lost is deduplicated by its delivery key), and the next batch or probe connects anew, so
the daemon recovers from a server restart without a restart of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from storage.deliveries import Delivery
from storage.errors import StorageUnavailable
from storage.postgres import heartbeat
from storage.postgres.connection import Connection, Synchronous, connect, where
from storage.postgres.migrations import migrate
from storage.postgres.outbox import latest_position
from storage.postgres.writes import commit_batch
from storage.writes import Outcome

log = logging.getLogger("transcriptd.writer")


class PostgresEngine:
    def __init__(self, url: str, *, synchronous: Synchronous = "full", replica: str = "") -> None:
        self.url = url
        self.replica = replica or "transcriptd"
        self._synchronous: Synchronous = synchronous
        self._conn: Connection | None = None

    def _connect(self) -> Connection:
        return connect(self.url, synchronous=self._synchronous, application_name=f"transcriptd {self.replica}")

    def open(self) -> None:
        conn = self._connect()
        try:
            if applied := migrate(conn):
                log.info("applied migrations %s to %s", applied, where(self.url))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def connection(self) -> Connection:
        """The connection, made anew if the last one was lost; ``StorageUnavailable`` while the server is
        unreachable."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
                self._conn = None
            self._conn = conn = self._connect()
            log.info("reconnected to PostgreSQL at %s", where(self.url))
        return conn

    def commit(self, batch: Sequence[Delivery], *, record_changes: bool) -> tuple[list[Outcome], int | None]:
        return commit_batch(self.connection(), batch, record_changes=record_changes)

    def probe(self) -> str | None:
        try:
            conn = self.connection()
        except StorageUnavailable as exc:
            return str(exc)
        return heartbeat.probe(conn, self.replica)

    def latest_position(self) -> int:
        return latest_position(self.connection())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
