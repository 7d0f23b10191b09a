"""The bench's baseline (bench/naive.py): the write-up's "before" and "after" paths store what they should."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.naive import (
    CACHED_PAGES,
    CREATE_CONVERSATION,
    INSERT_MESSAGE,
    InProcessDictCache,
    Variant,
    conversation_pattern,
    create_naive_app,
    message_row,
    open_database,
    page_key,
)
from bench.payloads import encode, transcription_ready
from storage.migrations import available

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
