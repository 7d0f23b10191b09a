"""One leader among the replicas, for work only one of them may do at a time (sending notifications).

A leader holds a session-level advisory lock on a connection of its own. The lock lives exactly as long
as that session: a replica that stops, crashes or loses its connection lets it go, and the server hands it
to the next replica that asks. Nothing else runs on the connection, so no transaction of the daemon's can
hold it up, and no statement timeout of another job can end the session.
"""

from __future__ import annotations

import contextlib
import logging

import psycopg

from storage.errors import StorageUnavailable
from storage.postgres.connection import Connection, connect

log = logging.getLogger("transcriptd.storage")

# pg_try_advisory_lock's key for the notification sender: "trnsnote".
NOTIFY_LEADER = 0x74726E736E6F7465


class Leader:
    """``leads()`` answers whether this replica is the leader now, asking for the lock when it is not.

    Call it before each round of the leader's work (it costs one round trip): a leader that lost its
    connection finds out there, and stops leading, before another replica may have taken over.
    """

    def __init__(self, url: str, key: int = NOTIFY_LEADER, *, application_name: str = "transcriptd leader") -> None:
        self.url = url
        self.key = key
        self.application_name = application_name
        self._conn: Connection | None = None
        self._leading = False

    @property
    def leading(self) -> bool:
        """What the last ``leads()`` found (no round trip)."""
        return self._leading

    def leads(self) -> bool:
        """True if this replica holds the lock: it held it and its session is still alive, or it took it
        now. False if another replica holds it, or the server cannot be reached (asked again next time)."""
        try:
            conn = self._connection()
            if self._leading:
                conn.execute("SELECT 1")
            else:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                self._leading = bool(row and row[0])
                if self._leading:
                    log.info("this replica leads (advisory lock %#x)", self.key)
        except (psycopg.Error, StorageUnavailable) as exc:
            if self._leading:
                log.warning("this replica stopped leading: its connection is lost (%s)", exc)
            self._drop()
        return self._leading

    def close(self) -> None:
        """Let the lock go (closing the session releases it), for another replica to take."""
        self._drop()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = connect(self.url, application_name=self.application_name)
        return self._conn

    def _drop(self) -> None:
        self._leading = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already gone: the lock went with the session
                conn.close()

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
