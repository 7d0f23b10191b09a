"""The bench's baseline (bench/naive.py): the write-up's "before" and "after" paths store what they should,
and bench/serve_naive.py serves them with the cache and round trip asked for."""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from bench import serve_naive
from bench.naive import (
    CACHED_PAGES,
    CREATE_CONVERSATION,
    INSERT_MESSAGE,
    InProcessDictCache,
    NaiveCache,
    SimulatedCache,
    Variant,
    conversation_pattern,
    create_naive_app,
    message_row,
    open_database,
    page_key,
)
from bench.payloads import encode, transcription_ready
from bench.redis_cache import check_redis_url
from storage.migrations import available

pytestmark = pytest.mark.sqlite_only("the benchmark's naive baseline is a SQLite port")

CID = "c-naive-1"
OTHER = "c-naive-other"
TURNS = 20


@asynccontextmanager
async def naive_client(
    db_path: Path, variant: Variant, cache: InProcessDictCache, **kwargs: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, lifespan and all: leaving the block is the shutdown (which drains "after")."""
    app = create_naive_app(db_path, variant=variant, cache=cache, **kwargs)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://naive.test") as client,
    ):
        yield client


def stored(db_path: Path, cid: str = CID) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            "SELECT source, seq, role, content, timestamp, created_at FROM messages WHERE conversation_id = ?"
            " ORDER BY seq",
            (cid,),
        ).fetchall()
    conn.close()
    return rows


def conversation(db_path: Path, cid: str = CID) -> tuple[Any, ...] | None:
    with sqlite3.connect(db_path) as conn:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT source, status, replica_id, message_count FROM conversations WHERE id = ?", (cid,)
        ).fetchone()
    conn.close()
    return row


async def seed(cache: InProcessDictCache) -> None:
    for cid in (CID, OTHER):
        for page in CACHED_PAGES:
            await cache.set(page_key(cid, page), "[]")
    await cache.set(f"messages:{CID}:11:50", "[]")  # past the 10 pages the "before" path names
    await cache.set(f"messages:{CID}:1:20", "[]")  # another page size


def check_rows(db_path: Path) -> None:
    body = transcription_ready(CID, turns=TURNS)
    entries = body["properties"]["transcript"]
    rows = stored(db_path)
    assert len(rows) == TURNS + 1
    assert [row[1] for row in rows] == list(range(TURNS + 1))
    assert {row[0] for row in rows} == {"tavus"}
    assert [(row[2], row[3]) for row in rows] == [(e["role"], e["content"]) for e in entries]
    assert rows[0][4] is None  # the system entry has no timestamp
    assert [row[4] for row in rows[1:]] == [e["timestamp"] for e in entries[1:]]
    assert all(isinstance(row[5], float) for row in rows)
    assert conversation(db_path) == ("tavus", "ended", "r79e1c033f", TURNS + 1)


@pytest.mark.anyio
async def test_before_answers_200_after_storing_every_row(db_path: Path) -> None:
    cache = InProcessDictCache()
    await seed(cache)
    async with naive_client(db_path, "before", cache) as client:
        response = await client.post("/webhooks/tavus", content=encode(transcription_ready(CID, turns=TURNS)))
        assert response.status_code == 200
        assert response.json() == {"status": "stored", "inserted": TURNS + 1}
        check_rows(db_path)  # before the shutdown: the answer came after the commit
    # The 10 DELs named pages 1..10 of 50: those are gone; other sizes, later pages and others' stay.
    assert not [page for page in CACHED_PAGES if page_key(CID, page) in cache.data]
    assert set(cache.data) == {f"messages:{CID}:11:50", f"messages:{CID}:1:20"} | {
        page_key(OTHER, page) for page in CACHED_PAGES
    }


@pytest.mark.anyio
async def test_after_answers_202_and_the_shutdown_drains_the_work(db_path: Path) -> None:
    cache = InProcessDictCache()
    await seed(cache)
    async with naive_client(db_path, "after", cache, statement_delay_s=0.01) as client:
        response = await client.post("/webhooks/tavus", content=encode(transcription_ready(CID, turns=TURNS)))
        assert response.status_code == 202
        # With a 10 ms round trip per statement, the background work cannot have finished yet.
        assert len(stored(db_path)) < TURNS + 1
    check_rows(db_path)
    # KEYS messages:{id}:* then DEL: every page of the conversation, any size; nobody else's.
    assert set(cache.data) == {page_key(OTHER, page) for page in CACHED_PAGES}
    assert await cache.delete_pattern(conversation_pattern(OTHER)) == len(CACHED_PAGES)


@pytest.mark.anyio
@pytest.mark.parametrize("variant", ["before", "after"])
async def test_the_same_transcript_twice_stores_no_duplicates(db_path: Path, variant: Variant) -> None:
    body = encode(transcription_ready(CID, turns=TURNS))
    cache = InProcessDictCache()
    async with naive_client(db_path, variant, cache) as client:
        first = await client.post("/webhooks/tavus", content=body)
        second = await client.post("/webhooks/tavus", content=body)
    assert first.status_code == second.status_code == (200 if variant == "before" else 202)
    if variant == "before":
        assert second.json()["inserted"] == 0
    check_rows(db_path)


@pytest.mark.anyio
@pytest.mark.parametrize("variant", ["before", "after"])
async def test_a_bad_body_is_refused_and_other_events_ignored(db_path: Path, variant: Variant) -> None:
    async with naive_client(db_path, variant, InProcessDictCache()) as client:
        assert (await client.post("/webhooks/tavus", content=b"{not json")).status_code == 400
        assert (await client.post("/webhooks/tavus", json={"event_type": "x"})).status_code == 400
        bad = transcription_ready(CID, turns=2)
        bad["properties"]["transcript"] = "nope"
        assert (await client.post("/webhooks/tavus", content=encode(bad))).status_code == 400
        other = {"conversation_id": CID, "event_type": "system.replica_joined", "properties": {}}
        assert (await client.post("/webhooks/tavus", json=other)).status_code == 200
    assert stored(db_path) == []
    assert conversation(db_path) is None


@pytest.mark.anyio
async def test_the_database_is_transcriptds(db_path: Path) -> None:
    async with naive_client(db_path, "before", InProcessDictCache()):
        pass
    with sqlite3.connect(db_path) as conn:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    conn.close()
    assert mode == "wal"
    assert versions == [migration.version for migration in available()]


@pytest.mark.anyio
async def test_a_failed_transaction_rolls_back_and_every_statement_is_a_round_trip(db_path: Path) -> None:
    db = await open_database(db_path)
    try:
        await db.execute(CREATE_CONVERSATION, (CID, "tavus", 1.0, 1.0))
        row = message_row(CID, 0, {"role": "user", "content": "hi"}, 1.0)

        async def insert_twice() -> None:
            async with db.transaction() as tx:
                await tx(INSERT_MESSAGE, row)
                await tx(INSERT_MESSAGE, row)  # the same position again: a plain INSERT refuses it

        with pytest.raises(sqlite3.IntegrityError):
            await insert_twice()
        assert db.statements == 4  # the create, BEGIN, two INSERTs (the ROLLBACK is not counted)
        async with db.transaction() as tx:
            await tx(INSERT_MESSAGE, row)
        assert db.statements == 7  # BEGIN, INSERT, COMMIT
    finally:
        await db.close()
    assert stored(db_path) == [("tavus", 0, "user", "hi", None, 1.0)]


@pytest.mark.anyio
async def test_the_simulated_cache_counts_a_command_per_round_trip_as_redis_would() -> None:
    cache = SimulatedCache()
    for page in (1, 2):
        await cache.set(page_key(CID, page), "[]")
    assert cache.commands == 2
    assert await cache.delete(page_key(CID, 1)) == 1
    assert await cache.delete(page_key(CID, 1)) == 0  # nothing left to delete: the DEL is still sent
    assert cache.commands == 4
    assert await cache.delete_pattern(conversation_pattern(CID)) == 1  # KEYS, then a DEL of what it found
    assert cache.commands == 6
    assert await cache.delete_pattern(conversation_pattern(CID)) == 0  # KEYS found nothing: no DEL
    assert cache.commands == 7
    assert cache.data == {}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("variant", "cached", "commands"), [("before", True, 10), ("after", True, 2), ("after", False, 1)]
)
async def test_the_handlers_cache_commands_are_counted(
    db_path: Path, variant: Variant, cached: bool, commands: int
) -> None:
    cache = SimulatedCache()
    if cached:
        for page in CACHED_PAGES:
            await cache.set(page_key(CID, page), "[]")
    seeded = cache.commands
    async with naive_client(db_path, variant, cache) as client:
        await client.post("/webhooks/tavus", content=encode(transcription_ready(CID, turns=TURNS)))
    # "before": 10 DELs, found or not; "after": KEYS, and a DEL only when KEYS found something.
    assert cache.commands - seeded == commands
    assert not [page for page in CACHED_PAGES if page_key(CID, page) in cache.data]
    check_rows(db_path)


def served_cache(monkeypatch: pytest.MonkeyPatch, db_path: Path, **options: Any) -> NaiveCache:
    """The cache ``build_app`` hands the naive app (no server is started)."""
    handed: list[NaiveCache] = []

    def recording(db: str | Path, *, variant: Variant, cache: NaiveCache, statement_delay_s: float = 0.0) -> Starlette:
        handed.append(cache)
        return create_naive_app(db, variant=variant, cache=cache, statement_delay_s=statement_delay_s)

    monkeypatch.setattr(serve_naive, "create_naive_app", recording)
    serve_naive.build_app(db_path, "before", **options)
    (cache,) = handed
    return cache


def test_the_served_memory_cache_pays_the_round_trip_too(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> None:
    cache = served_cache(monkeypatch, db_path, round_trip_ms=3.0, cache="memory")
    assert isinstance(cache, SimulatedCache)
    assert cache.command_delay_s == pytest.approx(0.003)
    without = served_cache(monkeypatch, db_path, cache="memory")
    assert isinstance(without, SimulatedCache)
    assert without.command_delay_s == 0


DATABASE_0 = "redis://127.0.0.1:6379/0"


def test_the_served_redis_is_never_database_0(db_path: Path) -> None:
    for function in (serve_naive.build_app, serve_naive.start_naive):
        default = inspect.signature(function).parameters["redis_url"].default
        check_redis_url(default)  # the bench's own database by default
    with pytest.raises(ValueError, match="database 0"):
        serve_naive.build_app(db_path, "after", cache="redis", redis_url=DATABASE_0)
    # Refused before any process is started, not by a server that then fails to listen.
    with pytest.raises(ValueError, match="database 0"):
        serve_naive.start_naive(db_path, "after", cache="redis", redis_url=DATABASE_0)
    with pytest.raises(SystemExit) as exited:
        serve_naive.main(["--variant", "after", "--db", str(db_path), "--cache", "redis", "--redis-url", DATABASE_0])
    assert exited.value.code == 2
    assert serve_naive.build_parser().parse_args(["--variant", "after", "--db", str(db_path)]).redis_url == (
        inspect.signature(serve_naive.build_app).parameters["redis_url"].default
    )
