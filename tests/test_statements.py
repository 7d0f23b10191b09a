"""Multi-row statements on a real SQLite file: chunking and padding never add, drop or reorder a row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage import statements as sql
from storage.connection import open_writer
from storage.migrations import migrate

pytestmark = pytest.mark.sqlite_only("SQLite's bound-parameter limits and multi-row statements")


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    connection = open_writer(tmp_path / "statements.db")
    migrate(connection)
    return connection


def test_padded_sizes_are_few_and_never_smaller_than_the_chunk() -> None:
    sizes = {sql.padded(n) for n in range(1, sql.MAX_CHUNK_ROWS + 1)}
    assert len(sizes) <= 16  # every one of them a statement to prepare and keep, per table
    for n in range(1, sql.MAX_CHUNK_ROWS + 1):
        assert n <= sql.padded(n) <= sql.MAX_CHUNK_ROWS
        assert sql.padded(n) - n < sql.PAD_STEP


@pytest.mark.parametrize("count", [1, 3, 31, 64, 65, 511, 512, 513, 1300])
def test_every_row_goes_in_once_and_in_order_whatever_the_padding(conn: sqlite3.Connection, count: int) -> None:
    keys = [(f"k{i:05d}", "test", "e", f"c{i % 7}", float(i), b"{}") for i in range(count)]
    assert sql.insert_rows(conn, sql.INSERT_EVENTS, keys) == count
    stored = conn.execute("SELECT delivery_key FROM events ORDER BY id").fetchall()
    assert [k for (k,) in stored] == [row[0] for row in keys]
    found = sql.select_rows(conn, sql.EXISTING_KEYS, [(row[0],) for row in keys], sql.EXISTING_KEYS_TAIL)
    assert sorted(k for (k,) in found) == [row[0] for row in keys]  # the padding matched nothing


def test_a_missing_key_is_still_refused_by_its_constraint_not_filtered_as_padding(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        sql.insert_rows(
            conn, sql.INSERT_EVENTS, [("k1", "test", "e", "c", 0.0, b"{}"), (None, "test", "e", "c", 0.0, b"")]
        )


def test_a_chunk_over_the_parameter_limit_is_refused_before_sqlite_sees_it() -> None:
    with pytest.raises(ValueError, match="parameters"):
        sql.multi_row("INSERT INTO t (a)", 100, 1024, "")


def test_none_is_stored_as_null_in_every_column_type(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('c', 'test', 0, 0)")
    row = ("c", "test", 0, "user", "hi", None, None, None, None, None, 1.0)
    assert sql.insert_rows(conn, sql.INSERT_MESSAGES, [row], sql.INSERT_MESSAGES_TAIL) == 1
    stored = conn.execute(
        "SELECT typeof(timestamp), typeof(seconds_from_start), typeof(duration), typeof(inference_id),"
        " typeof(external_id), timestamp FROM messages"
    ).fetchone()
    assert stored == ("null", "null", "null", "null", "null", None)


def test_a_vendor_row_binds_its_role_after_inference_id(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('c', 'test', 0, 0)")
    rows = [("c", "test", 0, "assistant", "hi", None, None, None, None, "bot", None, 1.0)]
    rows.append(("c", "test", 1, "user", "yo", None, None, None, None, None, None, 1.0))  # type: ignore[arg-type]
    assert sql.insert_rows(conn, sql.INSERT_VENDOR_MESSAGES, rows, sql.INSERT_MESSAGES_TAIL) == 2
    stored = conn.execute("SELECT role, vendor_role, typeof(vendor_role), created_at FROM messages ORDER BY seq")
    assert stored.fetchall() == [("assistant", "bot", "text", 1.0), ("user", None, "null", 1.0)]
