"""The normalised storage model: the vendor's role beside the normalised one, a conversation's end
reason, analysis and 'failed' status, and the migration that brings an existing database to it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from storage.connection import open_writer
from storage.deliveries import NULL, ConversationPatch, MessageRow, Record, VendorMessageRow
from storage.migrations import _statements, available, migrate
from storage.queries import Reader
from storage.writes import write_batch

NORMALISED = "normalised_model"  # by name: the migration's number is not fixed until the branches merge

pytestmark = pytest.mark.anyio


def delivery(
    key: str, cid: str, *, rows: list[MessageRow] | list[VendorMessageRow] | None = None, **patch: object
) -> Record:
    now = time.time()
    return Record(
        key=key,
        source="test",
        event_type="test.event",
        conversation_id=cid,
        received_at=now,
        body=b"{}",
        rows=rows or [],
        patch=ConversationPatch(**patch),  # type: ignore[arg-type]
    )


def row(cid: str, seq: int, role: str, content: str) -> MessageRow:
    return (cid, "test", seq, role, content, NULL, NULL, NULL, NULL, NULL, 1.0)


def vendor_row(cid: str, seq: int, role: str, content: str, vendor_role: str | None = None) -> VendorMessageRow:
    return (
        cid,
        "test",
        seq,
        role,
        content,
        NULL,
        NULL,
        NULL,
        NULL,
        NULL if vendor_role is None else vendor_role,
        NULL,
        1.0,
    )


@pytest.fixture
def conn(db_path: Path) -> sqlite3.Connection:
    conn = open_writer(db_path)
    migrate(conn)
    return conn


@pytest.mark.sqlite_only("SQLite's table rebuild in migration 0004")
def test_a_database_of_before_keeps_every_row_through_the_migration(db_path: Path) -> None:
    conn = open_writer(db_path)
    (target,) = [m for m in available() if m.name == NORMALISED]
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL)")
    for migration in available():
        if migration.version < target.version:
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (migration.version, migration.name))
    conn.execute(
        "INSERT INTO conversations (id, source, status, shutdown_reason, message_count, created_at, updated_at)"
        " VALUES ('old', 'tavus', 'ended', 'user left', 2, 1, 2)"
    )
    conn.executemany(
        "INSERT INTO messages (conversation_id, source, seq, role, content, created_at)"
        " VALUES ('old', 'tavus', ?, ?, ?, 1)",
        [(0, "user", "hello"), (1, "assistant", "hi")],
    )

    assert target.version in migrate(conn)

    # Rebuilding the conversations table cascaded nothing into messages, and foreign keys are back on.
    assert conn.execute("SELECT seq, role, content, vendor_role FROM messages ORDER BY seq").fetchall() == [
        (0, "user", "hello", None),
        (1, "assistant", "hi", None),
    ]
    assert conn.execute("SELECT status, shutdown_reason, end_reason, analysis FROM conversations").fetchall() == [
        ("ended", "user left", None, None)
    ]
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.execute("DELETE FROM conversations WHERE id = 'old'")  # the cascade still works
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    index = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'conversations'")
    assert ("conversations_by_activity",) in index.fetchall()


def test_failed_and_ended_are_sticky_in_any_order(conn: sqlite3.Connection) -> None:
    for cid, statuses in {
        "a": ["active", "failed", "ended", "active"],
        "b": ["ended", "active", "failed"],
        "c": ["active", "ended", "active"],
    }.items():
        for i, status in enumerate(statuses):
            write_batch(conn, [delivery(f"{cid}{i}", cid, status=status)])
    found = dict(conn.execute("SELECT id, status FROM conversations").fetchall())
    assert found == {"a": "failed", "b": "failed", "c": "ended"}
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE conversations SET status = 'lost' WHERE id = 'a'")


async def test_the_read_model_shows_vendor_roles_end_reason_and_analysis(
    conn: sqlite3.Connection, db_path: Path
) -> None:
    analysis = '{"summary": "booked", "successEvaluation": "true", "structuredData": {"slot": "9:00"}}'
    write_batch(
        conn,
        [
            delivery(
                "first",
                "v",
                rows=[vendor_row("v", 0, "assistant", "Hello", "bot"), vendor_row("v", 1, "user", "Hi")],
                status="ended",
                end_reason="customer-ended-call",
                analysis=analysis,
                recording_uri="https://example.test/r.wav",
            )
        ],
    )
    # A fuller later event at the same positions: the changed vendor role is rewritten, nothing duplicated.
    (again,) = write_batch(
        conn,
        [
            delivery(
                "second",
                "v",
                rows=[vendor_row("v", 0, "assistant", "Hello", "agent"), vendor_row("v", 1, "user", "Hi")],
            )
        ],
    )
    assert (again.inserted, again.updated) == (0, 1)  # type: ignore[union-attr]
    reader = Reader(db_path)
    await reader.open()
    try:
        record = await reader.conversation("v")
        messages = await reader.messages("v", source="test", limit=10)
    finally:
        await reader.close()
    assert record is not None
    assert (record.status, record.end_reason, record.recording.uri) == (
        "ended",
        "customer-ended-call",
        "https://example.test/r.wav",
    )
    assert record.analysis == {"summary": "booked", "successEvaluation": "true", "structuredData": {"slot": "9:00"}}
    assert [(m.role, m.vendor_role, m.content) for m in messages] == [
        ("assistant", "agent", "Hello"),
        ("user", None, "Hi"),
    ]


def test_one_commit_holds_rows_of_both_shapes(conn: sqlite3.Connection) -> None:
    """A source without vendor roles binds eleven columns, one with them twelve; one commit can hold both."""
    results = write_batch(
        conn,
        [
            delivery("plain", "p", rows=[row("p", 0, "user", "a"), row("p", 1, "assistant", "b")]),
            delivery("vendor", "q", rows=[vendor_row("q", 0, "assistant", "c", "bot")]),
            delivery("plain2", "r", rows=[row("r", 0, "user", "d")]),
        ],
    )
    assert [r.inserted for r in results] == [2, 1, 1]  # type: ignore[union-attr]
    stored = conn.execute("SELECT conversation_id, seq, role, vendor_role, content FROM messages ORDER BY 1, 2")
    assert stored.fetchall() == [
        ("p", 0, "user", None, "a"),
        ("p", 1, "assistant", None, "b"),
        ("q", 0, "assistant", "bot", "c"),
        ("r", 0, "user", None, "d"),
    ]
