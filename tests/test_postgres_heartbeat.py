"""Readiness on PostgreSQL: each replica commits a heartbeat row of its own, and a server that takes no
writes shows in its probe."""

from __future__ import annotations

from storage.postgres.connection import connect
from storage.postgres.heartbeat import probe


def test_each_replica_beats_in_its_own_row(postgres_url: str) -> None:
    with connect(postgres_url) as one, connect(postgres_url) as two:
        assert probe(one, "replica-a") is None
        assert probe(two, "replica-b") is None
        assert probe(one, "replica-a") is None
        rows = one.execute("SELECT replica FROM heartbeat ORDER BY replica").fetchall()
        assert rows == [("replica-a",), ("replica-b",)]


def test_a_server_that_takes_no_writes_shows_in_the_probe(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        conn.execute("SET default_transaction_read_only = on")  # as a standby after a failover answers
        problem = probe(conn, "replica-a")
        assert problem is not None
        assert "read-only" in problem
        conn.execute("SET default_transaction_read_only = off")
        assert probe(conn, "replica-a") is None
