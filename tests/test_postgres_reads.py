"""The PostgreSQL Reader against SQLite's: the same deliveries written through both backends, then every
read method called on both with the same arguments, and the answers compared. And what only a shared
server has: rev() for cross-replica caches, an unreachable server at open, a connection lost mid-read."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest

from storage.connection import open_writer
from storage.deliveries import Record
from storage.errors import StorageError, StorageUnavailable
from storage.migrations import migrate
from storage.postgres import erasure as pg_erasure
from storage.postgres.connection import ServerUnreachable, connect
from storage.postgres.queries import Reader as PgReader
from storage.postgres.writes import write_batch as pg_write_batch
from storage.queries import ConversationFilter
from storage.queries import Reader as LiteReader
from storage.writes import commit_batch
from tests.test_postgres_writes import NOW, append, event, scenario, with_metadata

pytestmark = pytest.mark.anyio


def extra_batches() -> list[list[Record]]:
    """Ids that byte order and a linguistic collation sort differently, post-call actions, ties on
    updated_at, and every role."""
    return [
        [
            append("C-upper", [{"role": "user", "content": "capital"}], at=NOW + 50),
            append("c-\u00fc", [{"role": "tool", "content": "umlaut"}], at=NOW + 50),
            append("c-z", [{"role": "system", "content": "prompt"}, {"role": "user", "content": "z"}], at=NOW + 50),
            append("c_under", [{"role": "assistant", "content": "under"}], at=NOW + 50),
            with_metadata(append("c-meta", [{"role": "user", "content": "m"}], at=NOW + 51), {"team": "a", "k": "v"}),
            event(
                "c-a",
                "application.post_call_action_executed",
                {"tool_name": "crm", "status": "ok", "request": {"x": 1}, "response": ["y"]},
                at=NOW + 52,
            ),
            event("c-a", "application.post_call_action_executed", {"tool_name": 7}, at=NOW + 53),
        ],
    ]


@dataclass
class Both:
    lite: LiteReader
    pg: PgReader
    lite_conn: sqlite3.Connection
    pg_url: str


@pytest.fixture
async def both(postgres_url: str, tmp_path: Path) -> AsyncIterator[Both]:
    path = tmp_path / "transcriptd.db"
    lite = open_writer(path)
    migrate(lite)
    pg = connect(postgres_url)
    for conn in (lite, pg):
        conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('c-erased', 1.0)")
    for batch in scenario() + extra_batches():
        commit_batch(lite, batch)
        pg_write_batch(pg, batch)
    # The outbox rows as SQLite's writer recorded them, in place of PostgreSQL's own: the same rows but for
    # their commit times (tests/test_postgres_outbox.py compares the two writers'), so the feed's answers
    # can be compared whole.
    changes = lite.execute(
        "SELECT position, conversation_id, source, status, kinds, first_seq, last_seq, committed_at FROM changes"
    ).fetchall()
    assert len(changes) > 10
    pg.execute("DELETE FROM changes")
    with pg.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO changes (position, conversation_id, source, status, kinds, first_seq, last_seq, committed_at)"
            " OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            changes,
        )
    pg.close()
    readers = Both(LiteReader(path), PgReader(postgres_url), lite, postgres_url)
    await readers.lite.open()
    await readers.pg.open()
    try:
        yield readers
    finally:
        await readers.lite.close()
        await readers.pg.close()
        lite.close()


def conversation_ids(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT id FROM conversations ORDER BY id")]


def builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


async def test_conversation_and_post_call_actions_equal_sqlites(both: Both) -> None:
    ids = conversation_ids(both.lite_conn)
    assert {"c-a", "c-g", "C-upper", "c-\u00fc"} <= set(ids)
    for cid in [*ids, "c-missing", "c-erased"]:
        expected = await both.lite.conversation(cid)
        assert builtins(await both.pg.conversation(cid)) == builtins(expected), cid
        assert await both.pg.post_call_actions(cid) == await both.lite.post_call_actions(cid)
    record = await both.pg.conversation("c-a")
    assert record is not None
    assert [(a.tool_name, a.status, a.request, a.response) for a in record.post_call_actions] == [
        ("crm", "ok", {"x": 1}, ["y"]),
        (None, None, None, None),
    ]
    assert record.metadata == {"team": "a", "x": "1", "y": "2"}


async def test_conversations_pages_and_filters_equal_sqlites(both: Both) -> None:
    filters = [
        None,
        ConversationFilter(status="ended"),
        ConversationFilter(status="active"),
        ConversationFilter(source="tavus"),
        ConversationFilter(source="api", status="active"),
        ConversationFilter(updated_since=NOW + 30),
        ConversationFilter(metadata=(("team", "a"),)),
        ConversationFilter(metadata=(("team", "a"), ("k", "v"))),
        ConversationFilter(metadata=(("team", "nobody"),)),
        ConversationFilter(source="no-such-source"),
    ]
    for where in filters:
        for limit in (1, 2, 5, 100):
            pages: list[list[str]] = []
            before: dict[str, tuple[float, str] | None] = {"lite": None, "pg": None}
            while True:
                lite = await both.lite.conversations(limit, before["lite"], where)
                pg = await both.pg.conversations(limit, before["pg"], where)
                assert builtins(pg) == builtins(lite), (where, limit, before)
                if not lite:
                    break
                pages.append([c.id for c in lite])
                before = {"lite": (lite[-1].updated_at, lite[-1].id), "pg": (pg[-1].updated_at, pg[-1].id)}
            seen = [cid for page in pages for cid in page]
            assert len(seen) == len(set(seen))
    everything = await both.pg.conversations(100, None)
    # Ties on updated_at go by id in byte order (descending), whatever the database's collation.
    tied = [c.id for c in everything if c.updated_at == NOW + 50]
    assert tied == ["c_under", "c-\u00fc", "c-z", "C-upper"]


async def test_messages_and_has_role_equal_sqlites(both: Both) -> None:
    streams = both.lite_conn.execute("SELECT DISTINCT conversation_id, source FROM messages").fetchall()
    assert len(streams) > 8
    for cid, source in [*streams, ("c-missing", "api"), ("c-a", "api")]:
        for kwargs in (
            {"limit": 1000},
            {"limit": 3},
            {"limit": 3, "offset": 2},
            {"limit": 5, "after": 2},
            {"limit": 1000, "include_system": True},
            {"limit": 1000, "role": "system"},
            {"limit": 1000, "role": "user", "after": 1},
            {"limit": 1000, "role": "assistant", "offset": 1},
        ):
            lite = await both.lite.messages(cid, source=source, **kwargs)
            pg = await both.pg.messages(cid, source=source, **kwargs)
            assert pg == lite, (cid, source, kwargs)
        for role in ("user", "assistant", "system", "tool", "nobody"):
            assert await both.pg.has_role(cid, role) == await both.lite.has_role(cid, role), (cid, role)
    assert [m.content for m in await both.pg.messages("c-g", source="api", limit=100)][:2] == ["one, edited", "two"]


def without_ids(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Timeline rows without the row id (each backend numbers its own) and the dead letter's error text
    (each database words its refusal its own way)."""
    return [(row[0], *row[2:8], row[8] if row[0] == 0 else "error", *row[9:]) for row in rows]


async def test_timeline_and_event_bodies_equal_sqlites(both: Both) -> None:
    ids = [*conversation_ids(both.lite_conn), "c-bad", "c-big", "c-missing"]
    for cid in ids:
        for bodies in (False, True):
            whole = {
                name: await reader.timeline(cid, limit=1000, after=None, bodies=bodies)
                for name, reader in (("lite", both.lite), ("pg", both.pg))
            }
            assert without_ids(whole["pg"]) == without_ids(whole["lite"]), (cid, bodies)
            # Paged two at a time, each backend with its own cursors: the same rows in the same pages.
            after: dict[str, tuple[float, int, int] | None] = {"lite": None, "pg": None}
            paged: list[tuple[Any, ...]] = []
            while True:
                lite = await both.lite.timeline(cid, limit=2, after=after["lite"], bodies=bodies)
                pg = await both.pg.timeline(cid, limit=2, after=after["pg"], bodies=bodies)
                assert without_ids(pg) == without_ids(lite)
                if not pg:
                    break
                paged += pg
                after = {"lite": (lite[-1][4], lite[-1][0], lite[-1][1]), "pg": (pg[-1][4], pg[-1][0], pg[-1][1])}
            assert paged == whole["pg"]
        rows = {
            name: await r.timeline(cid, limit=1000, after=None, bodies=True)
            for name, r in (("lite", both.lite), ("pg", both.pg))
        }
        for lite_row, pg_row in zip(rows["lite"], rows["pg"], strict=True):
            body = await both.pg.event_body(cid, pg_row[0], pg_row[1])
            assert isinstance(body, bytes)
            assert body == await both.lite.event_body(cid, lite_row[0], lite_row[1]) == pg_row[-1]
            assert await both.pg.event_body("c-other", pg_row[0], pg_row[1]) is None
    assert await both.pg.event_body("c-a", 0, 10**12) is None
    dead = await both.pg.timeline("c-bad", limit=10, after=None, bodies=False)
    assert [(row[0], row[-1]) for row in dead] == [(1, None)]


async def test_changes_equal_sqlites(both: Both) -> None:
    (last,) = both.lite_conn.execute("SELECT max(position) FROM changes").fetchone()
    for after, limit in ((0, 1000), (0, 3), (2, 5), (last - 1, 10), (last, 10)):
        pg = await both.pg.changes(after, limit)
        assert pg == await both.lite.changes(after, limit)
    assert len(await both.pg.changes(0, 1000)) == last


async def test_rev_moves_with_every_write_and_sqlite_has_none(both: Both) -> None:
    assert both.pg.shared is True
    assert both.lite.shared is False
    assert await both.lite.rev("c-g") is None
    assert await both.pg.rev("c-missing") is None
    before = await both.pg.rev("c-g")
    untouched = await both.pg.rev("c-a")
    assert before is not None
    with connect(both.pg_url) as conn:
        pg_write_batch(conn, [append("c-g", [{"role": "user", "content": "seven"}], at=NOW + 60)])
    after = await both.pg.rev("c-g")
    assert after is not None
    assert after > before
    assert await both.pg.rev("c-a") == untouched
    with connect(both.pg_url) as conn:
        pg_write_batch(conn, [append("c-new", [{"role": "user", "content": "new"}], at=NOW + 61)])
    first_life = await both.pg.rev("c-new")
    assert first_life is not None
    # Erased and written again: a page another replica cached in its first life must not match its second.
    with connect(both.pg_url) as conn:
        assert pg_erasure.erase(conn, "c-new") is not None
        assert pg_erasure.undo(conn, "c-new") is not None
        pg_write_batch(conn, [append("c-new", [{"role": "user", "content": "again"}], at=NOW + 62)])
    second_life = await both.pg.rev("c-new")
    assert second_life is not None
    assert second_life != first_life


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port: int = listener.getsockname()[1]
    return port


async def test_an_unreachable_server_at_open_is_one_line_without_the_password() -> None:
    port = closed_port()
    reader = PgReader(f"postgresql://transcriptd:s3cret-pw@127.0.0.1:{port}/transcripts")
    with pytest.raises(ServerUnreachable) as raised:
        await reader.open()
    message = str(raised.value)
    assert message.startswith(f"cannot use PostgreSQL at 127.0.0.1:{port}/transcripts: ")
    assert "s3cret-pw" not in message
    assert "transcriptd:" not in message
    assert "\n" not in message
    await reader.close()  # nothing was opened: closing is harmless


async def test_a_pooled_connection_lost_since_its_last_read_costs_no_error(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        pg_write_batch(conn, [append("c-1", [{"role": "user", "content": "hello"}])])
    reader = PgReader(postgres_url, connections=1)
    await reader.open()
    try:
        ((pid,),) = await reader._all("SELECT pg_backend_pid()", ())
        with connect(postgres_url) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        # The only pooled connection is gone (as after a server restart): the read runs again on a new one.
        record = await reader.conversation("c-1")
        assert record is not None
        assert record.message_count == 1
        ((new_pid,),) = await reader._all("SELECT pg_backend_pid()", ())
        assert new_pid != pid
    finally:
        await reader.close()


async def test_a_reader_whose_server_is_gone_answers_storage_unavailable(postgres_url: str) -> None:
    reader = PgReader(postgres_url, connections=1)
    await reader.open()
    try:
        # No connection to be had (the pool is closed under it): the read tries twice, then it is a 503.
        assert reader._pool is not None
        await reader._pool.close()
        with pytest.raises(StorageUnavailable) as raised:
            await reader.conversation("c-1")
        assert isinstance(raised.value, StorageError)
        assert "storage is unavailable" in str(raised.value)
    finally:
        await reader.close()


async def test_the_reader_cannot_write(postgres_url: str) -> None:
    reader = PgReader(postgres_url)
    await reader.open()
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await reader._all("INSERT INTO heartbeat (replica, at) VALUES ('x', 1)", ())
    finally:
        await reader.close()


async def test_a_nul_in_any_argument_finds_nothing_as_on_sqlite(both: Both) -> None:
    for reader in (both.lite, both.pg):
        assert await reader.conversation("c-a\x00") is None
        assert await reader.messages("c-a\x00", source="tavus", limit=10) == []
        assert await reader.messages("c-a", source="tavus", role="user\x00", limit=10) == []
        assert await reader.has_role("c-a", "user\x00") is False
        assert await reader.timeline("c-a\x00", limit=10, after=None, bodies=True) == []
        assert await reader.event_body("c-a\x00", 0, 1) is None
        assert await reader.conversations(10, None, ConversationFilter(metadata=(("team", "a\x00"),))) == []
        assert await reader.conversations(10, (NOW + 100, "c-\x00"), ConversationFilter(source="tavus\x00")) == []
        assert await reader.rev("c-a\x00") is None
    assert await both.pg.has_role("c-a", "user") is True
    for before in ((NOW + 50, "c-\x00"), (NOW + 50, "c-z\x00a"), (NOW + 50, "\x00"), (NOW + 50, "c_under\x00")):
        lite = await both.lite.conversations(100, before)
        assert builtins(await both.pg.conversations(100, before)) == builtins(lite), before


async def test_two_replicas_readers_see_each_commit_at_once_and_many_reads_share_two_connections(
    postgres_url: str,
) -> None:
    """Two Readers stand for two replicas; a third connection writes. After each commit both see the new
    rev and the new message, whichever replica wrote: what a rev-checked cache relies on."""
    one, two = PgReader(postgres_url, connections=2), PgReader(postgres_url, connections=2)
    await one.open()
    await two.open()
    try:
        with connect(postgres_url) as writer:
            revs: list[int] = []
            for i in range(5):
                pg_write_batch(writer, [append("c-shared", [{"role": "user", "content": f"m{i}"}], at=NOW + i)])
                rev = await one.rev("c-shared")
                assert rev is not None
                assert await two.rev("c-shared") == rev
                revs.append(rev)
                for reader in (one, two):
                    messages = await reader.messages("c-shared", source="api", limit=100)
                    assert [m.content for m in messages] == [f"m{j}" for j in range(i + 1)]
            assert revs == sorted(set(revs))  # rose with every commit
        answers: list[int] = []

        async def read(reader: PgReader) -> None:
            record = await reader.conversation("c-shared")
            assert record is not None
            answers.append(record.message_count)

        async with anyio.create_task_group() as group:
            for i in range(40):
                group.start_soon(read, one if i % 2 else two)
        assert answers == [5] * 40
    finally:
        await one.close()
        await two.close()
