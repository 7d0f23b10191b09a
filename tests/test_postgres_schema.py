"""The PostgreSQL schema: migrations in step with SQLite's, applied once under an advisory lock however many
replicas start together; connecting from a URL, and the one line an unreachable server gives."""

from __future__ import annotations

import threading

import pytest

from storage.errors import StorageUnavailable
from storage.migrations import available as sqlite_migrations
from storage.postgres.connection import ServerUnreachable, connect, unreachable, where
from storage.postgres.migrations import available, migrate
from tests.postgres_tools import fresh_schema

# Every SQLite migration's number: PostgreSQL applies the same ones.
EVERY_VERSION = [m.version for m in sqlite_migrations()]


def test_the_migrations_match_sqlites_by_number_and_name() -> None:
    assert [(m.version, m.name) for m in available()] == [(m.version, m.name) for m in sqlite_migrations()]


def test_migrating_twice_applies_each_migration_once(postgres_database: str) -> None:
    with fresh_schema(postgres_database, migrated=False) as url, connect(url) as conn:
        assert migrate(conn) == EVERY_VERSION
        assert migrate(conn) == []
        ledger = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert ledger == [(m.version, m.name) for m in sqlite_migrations()]


def test_replicas_migrating_at_once_apply_each_migration_once(postgres_database: str) -> None:
    with fresh_schema(postgres_database, migrated=False) as url:
        start = threading.Barrier(3)
        applied: list[list[int]] = []
        failures: list[BaseException] = []

        def replica() -> None:
            try:
                with connect(url) as conn:
                    start.wait()
                    applied.append(migrate(conn))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=replica) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert sorted(v for versions in applied for v in versions) == EVERY_VERSION
        with connect(url) as conn:
            (count,) = conn.execute("SELECT count(*) FROM schema_migrations").fetchone() or (0,)
            assert count == len(EVERY_VERSION)


def test_key_columns_compare_bytes_as_sqlite_does(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        collations = conn.execute(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND column_name IN ('id', 'conversation_id', 'delivery_key')"
            " AND data_type = 'text'"
        ).fetchall()
        assert {(t, c) for t, c, _ in collations} >= {
            ("conversations", "id"),
            ("messages", "conversation_id"),
            ("events", "delivery_key"),
            ("tombstones", "conversation_id"),
        }
        assert {collation for _, _, collation in collations} == {"C"}


@pytest.mark.parametrize(("synchronous", "expected"), [("full", "on"), ("normal", "off")])
def test_storage_synchronous_sets_synchronous_commit(postgres_url: str, synchronous: str, expected: str) -> None:
    with connect(postgres_url, synchronous=synchronous) as conn:  # type: ignore[arg-type]
        assert conn.execute("SHOW synchronous_commit").fetchone() == (expected,)
        # The URL's own options (here the test's search_path) are kept beside it.
        assert conn.execute("SHOW search_path").fetchone() != ('"$user", public',)


def test_an_unreachable_server_is_one_line_naming_host_and_port_but_not_the_password() -> None:
    url = "postgresql://transcriptd:hunter2-Secret@127.0.0.1:1/transcripts"
    with pytest.raises(ServerUnreachable) as raised:
        connect(url)
    message = str(raised.value)
    assert isinstance(raised.value, StorageUnavailable)
    assert "\n" not in message
    assert "127.0.0.1:1/transcripts" in message
    assert "hunter2" not in message
    assert "transcriptd:" not in message


def test_a_reason_that_echoes_the_password_is_scrubbed() -> None:
    url = "postgresql://u:pa55word@db.example:6543/x"
    line = unreachable(url, RuntimeError("connection failed: something about pa55word failed: no"))
    assert line == "cannot use PostgreSQL at db.example:6543/x: no"
    assert where("postgresql://u:pa55word@db.example/x?sslmode=require") == "db.example:5432/x"
    assert "pa55word" not in unreachable(url, RuntimeError("bad pa55word"))
