"""The readiness probe's commit on PostgreSQL: one heartbeat row per replica, so each replica shows
whether it can commit now (its own connection, its own row: replicas never contend on it)."""

from __future__ import annotations

import time

import psycopg

from storage.postgres.connection import Connection

BEAT = """
INSERT INTO heartbeat (replica, at) VALUES (%s, %s)
ON CONFLICT (replica) DO UPDATE SET at = excluded.at
"""


def probe(conn: Connection, replica: str) -> str | None:
    """Commit ``replica``'s heartbeat row: None if the server takes writes now, else why not (a
    read-only server after a failover, a full disk, a lost connection)."""
    try:
        with conn.transaction():
            conn.execute(BEAT, (replica, time.time()))
    except psycopg.Error as exc:
        return f"{exc.__class__.__name__}: {exc}".strip()
    return None
