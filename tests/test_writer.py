"""The group-commit writer on a real SQLite file and PostgreSQL schema: batching, poison isolation, storage
faults, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.inflight import InFlight
from storage.backend import is_postgres_url
from storage.connection import open_writer
from storage.deliveries import MessageRow, Record
from storage.errors import StorageRejected, StorageUnavailable
from storage.migrations import available, migrate
from storage.writer import Writer, WriterSettings
from tests.conftest import AppClient, execute, locked
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.anyio

Query = Any


def delivery(cid: str, contents: list[str], *, awaited: bool = True) -> InFlight:
    now = time.time()
    rows: list[MessageRow] = [
        (cid, "test", i, "user", c, None, None, None, None, None, now) for i, c in enumerate(contents)
    ]
    record = Record(
        key=f"test:{cid}:{len(contents)}",
        source="test",
        event_type="test",
        conversation_id=cid,
        received_at=now,
        body=b"{}",
        rows=rows,
    )
    return InFlight(record, awaited=awaited)


async def test_one_commit_for_many_units_and_each_delivery_resolved(target: str, db: Query) -> None:
    # The batch is held open long enough for every unit below to join it.
    writer = Writer(WriterSettings(target, max_delay_s=0.3))
    units = [[delivery(f"c{i}", ["a", "b"]), delivery(f"c{i}-b", ["c"])] for i in range(20)]
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for unit in units:
            assert writer.offer(unit)
        for unit in units:
            await unit[-1].done.wait()
        await writer.close()
    assert writer.commits == 1
    results = [d.result for unit in units for d in unit]
    assert all(r is not None and r.inserted == r.received for r in results)
    assert db("SELECT count(*) FROM messages") == [(60,)]


async def test_a_poisoned_delivery_does_not_sink_its_batch(target: str, db: Query) -> None:
    writer = Writer(WriterSettings(target))
    good_before, good_after = delivery("good-1", ["fine"]), delivery("good-2", ["also fine"])
    poison = delivery("poison", ["ok", "\ud800 a lone surrogate cannot be stored as UTF-8"])
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        assert writer.offer([good_before, poison, good_after])
        await good_after.done.wait()
        await writer.close()
    assert isinstance(poison.error, StorageRejected)
    assert good_before.result is not None
    assert good_after.result is not None
    assert db("SELECT conversation_id FROM messages ORDER BY id") == [("good-1",), ("good-2",)]
    # Rolled back to its savepoint: not even its event or conversation row is left behind.
    assert db("SELECT count(*) FROM events WHERE conversation_id = 'poison'") == [(0,)]
    assert db("SELECT count(*) FROM conversations WHERE id = 'poison'") == [(0,)]


async def test_a_locked_database_fails_waiters_and_retries_what_was_acknowledged(target: str, db: Query) -> None:
    writer = Writer(WriterSettings(target, busy_timeout_ms=20))
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        with locked(target):
            waited = delivery("durable", ["x"], awaited=True)
            acked = delivery("enqueued", ["y"], awaited=False)
            assert writer.offer([waited, acked])
            await waited.done.wait()
            assert isinstance(waited.error, StorageUnavailable)
            assert not acked.done.is_set()
            # The storage's own words: SQLite's "database is locked", PostgreSQL's "lock timeout".
            assert ("lock timeout" if is_postgres_url(target) else "locked") in (writer.last_error or "")
            assert await writer.probe() is not None
        # The lock is gone: the acknowledged delivery is committed by the retry, without anyone resending it.
        with anyio.fail_after(10):
            await acked.done.wait()
        assert writer.healthy
        await writer.close()
    assert db("SELECT conversation_id FROM messages") == [("enqueued",)]


async def test_storage_fault_is_503_with_retry_after_then_recovers(app_client: AppClient, target: str) -> None:
    body = encode(transcription_ready("c-fault", turns=5))
    settings = {"storage.busy_timeout_ms": 20, "ingest.retry_after_s": 3}
    async with app_client(**settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        with locked(target):
            refused = await client.post("/webhooks/tavus", content=body)
            not_ready = await client.get("/readyz")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "storage_unavailable"
        assert refused.headers["retry-after"]
        assert not_ready.status_code == 503
        assert not_ready.json()["storage_error"]
        # The sender retries once the fault is gone, and is stored.
        stored = await client.post("/webhooks/tavus", content=body)
        assert stored.status_code == 200
        assert stored.json()["inserted"] == 6
        assert (await client.get("/readyz")).status_code == 200


def test_migrations_apply_once_and_are_recorded(db_path: Path) -> None:
    conn = open_writer(db_path)
    try:
        assert migrate(conn) == [m.version for m in available()]
        assert migrate(conn) == []
        ledger = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert ledger == [(m.version, m.name) for m in available()]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


@pytest.mark.parametrize(("setting", "expected"), [("full", 2), ("normal", 1)])
def test_synchronous_setting(db_path: Path, setting: Any, expected: int) -> None:
    conn = open_writer(db_path, synchronous=setting)
    try:
        assert conn.execute("PRAGMA synchronous").fetchone() == (expected,)
    finally:
        conn.close()


async def test_a_database_that_cannot_open_fails_start_up(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    writer = Writer(WriterSettings(tmp_path / "dir.db"))
    with pytest.RaisesGroup(sqlite3.OperationalError):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
    assert writer.state == "closed"


async def test_a_batch_stops_growing_at_max_rows(target: str, db: Query) -> None:
    writer = Writer(WriterSettings(target, max_rows=10, max_delay_s=0.3))
    units = [[delivery(f"c{i}", ["a", "b", "c", "d"])] for i in range(6)]  # 5 rows each, with the event
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for unit in units:
            assert writer.offer(unit)
        await units[-1][-1].done.wait()
        await writer.close()
    assert writer.commits == 3
    assert db("SELECT count(*) FROM messages") == [(24,)]


async def test_readiness_recovers_without_any_delivery(app_client: AppClient, target: str) -> None:
    async with app_client(**{"storage.busy_timeout_ms": 20}) as client:
        with locked(target):
            await client.post("/webhooks/tavus", content=encode(transcription_ready("c-r", turns=1)))
            assert (await client.get("/readyz")).status_code == 503
        # No sender comes back (a load balancer stopped routing here): the probe alone must clear it.
        ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert "storage_error" not in ready.json()


async def test_the_registry_closes_in_time_even_when_the_writer_never_commits() -> None:
    from daemon.actors import ActorRegistry

    class NeverCommits:
        def __init__(self) -> None:
            self.units: list[list[InFlight]] = []

        def offer(self, unit: list[InFlight]) -> bool:
            self.units.append(unit)
            return True  # taken, and never resolved: the actor waits for ever

    sink = NeverCommits()
    registry = ActorRegistry(sink, mailbox_size=4, max_rows=100, retry_after_s=1)
    held, waiting = delivery("stuck", ["x"]), delivery("stuck", ["y", "z"])
    registry.submit(held)
    registry.submit(waiting)  # behind the unit in flight, in the mailbox
    with anyio.fail_after(5):
        finished = await registry.close(timeout_s=0.2)
    assert finished is False
    assert registry.state == "closed"
    assert registry.inflight_bytes == 0
    assert registry.live_actors == 0
    assert sink.units == [[held]]
    assert not held.done.is_set()  # the writer's to settle
    assert waiting.done.is_set()
    assert waiting.error is not None


async def test_retention_inside_the_daemon_removes_exactly_the_old(
    app_client: AppClient, target: str, db: Query
) -> None:
    async with app_client(**{"storage.retention_days": 30}) as client:
        for cid in ("old-1", "old-2", "fresh"):
            await client.post("/webhooks/tavus", content=encode(transcription_ready(cid, turns=3)))
        await client.get("/conversations/old-1")  # cached: must not outlive the removal
        execute(target, "UPDATE conversations SET updated_at = updated_at - 40 * 86400 WHERE id LIKE 'old-%'")
        janitor = client.app.state.runtime.janitor  # type: ignore[attr-defined]
        assert await janitor.sweep() == 2
        assert (await client.get("/conversations/old-1")).status_code == 404
        assert (await client.get("/conversations/fresh")).status_code == 200
        assert await janitor.sweep() == 0
    assert db("SELECT DISTINCT conversation_id FROM messages") == [("fresh",)]
    assert db("SELECT DISTINCT conversation_id FROM events") == [("fresh",)]


def test_a_new_database_gets_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    from storage.connection import PAGE_SIZE

    fresh = open_writer(tmp_path / "new.db")
    assert fresh.execute("PRAGMA page_size").fetchone() == (PAGE_SIZE,)
    fresh.close()
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("PRAGMA page_size = 4096")
    old.execute("CREATE TABLE t (x)")
    old.close()
    reopened = open_writer(tmp_path / "old.db")
    assert reopened.execute("PRAGMA page_size").fetchone() == (4096,)
    assert reopened.execute("PRAGMA wal_autocheckpoint").fetchone() == (64 * 1024 * 1024 // 4096,)
    migrate(reopened)  # and it takes the schema like any other
    reopened.close()
