"""Erasure on real SQLite files and PostgreSQL schemas: ``DELETE /conversations/{id}`` through the in-process
app, the writer's set-based tombstone check, and ``transcriptd delete`` as a real subprocess, beside a real
serving daemon."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from msgspec.structs import replace

from storage import erasure
from storage.connection import open_writer
from storage.deliveries import Record
from storage.migrations import migrate
from storage.writes import write_batch
from tests.conftest import AppClient
from tests.daemon_process import WEBHOOK, managed, rows, start_daemon, transcriptd
from tests.payloads import encode, envelope, transcription_ready
from tests.test_cli_help import expected_words, help_text, subcommands
from tests.test_dead_letters import cure, poison, poisoned_body

TURNS = 4  # and the system entry: 5 messages per transcript
TABLES = {
    "messages": "SELECT count(*) FROM messages WHERE conversation_id = ?",
    "events": "SELECT count(*) FROM events WHERE conversation_id = ?",
    "dead_letters": "SELECT count(*) FROM dead_letters WHERE conversation_id = ?",
    "conversations": "SELECT count(*) FROM conversations WHERE id = ?",
}


def held(path: Path | str, cid: str) -> dict[str, int]:
    """How many rows of each table belong to ``cid``."""
    return {table: rows(path, sql, (cid,))[0][0] for table, sql in TABLES.items()}


def tombstone(path: Path | str, cid: str) -> tuple[Any, ...] | None:
    found = rows(path, "SELECT deleted_at, dropped FROM tombstones WHERE conversation_id = ?", (cid,))
    return found[0] if found else None


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, text
    return values[0]


async def store(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post(WEBHOOK, content=encode(body))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"


pytestmark = pytest.mark.anyio


async def test_delete_erases_everything_of_one_conversation_and_nothing_of_another(
    app_client: AppClient, target: str
) -> None:
    async with app_client() as client:
        for cid in ("c-gone", "c-kept"):
            await store(client, transcription_ready(cid, turns=TURNS))
            await store(client, envelope(cid, "system.shutdown", {"shutdown_reason": "end_call"}))
        appended = await client.post("/conversations/c-gone/messages", json={"role": "user", "content": "hi"})
        assert appended.status_code == 200, appended.text
        # A delivery the database refuses leaves a dead letter of each conversation.
        poison(target)
        for cid in ("c-gone", "c-kept"):
            assert (await client.post(WEBHOOK, content=poisoned_body(cid))).status_code >= 500
        cure(target)
        # Cached pages of both, so that the cache has something to serve.
        for cid in ("c-gone", "c-kept"):
            assert (await client.get(f"/conversations/{cid}")).status_code == 200
            assert (await client.get(f"/conversations/{cid}/messages")).status_code == 200
        kept_before = held(target, "c-kept")
        kept_page = (await client.get("/conversations/c-kept/messages")).json()
        assert held(target, "c-gone") == {"messages": 6, "events": 3, "dead_letters": 1, "conversations": 1}

        response = await client.delete("/conversations/c-gone")
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["status"] == "erased"
        assert answer["conversation_id"] == "c-gone"
        assert answer["removed"] == {
            "conversations": 1,
            "messages": 6,
            "events": 3,
            "dead_letters": 1,
            "cached_pages": 2,
        }
        assert held(target, "c-gone") == dict.fromkeys(TABLES, 0)
        assert held(target, "c-kept") == kept_before
        assert tombstone(target, "c-gone") == (answer["deleted_at"], 0)

        # The cache no longer serves it; the other one is served as before.
        assert (await client.get("/conversations/c-gone")).status_code == 404
        assert (await client.get("/conversations/c-gone/messages")).status_code == 404
        listed = (await client.get("/conversations")).json()["conversations"]
        assert [c["id"] for c in listed] == ["c-kept"]
        assert (await client.get("/conversations/c-kept/messages")).json() == kept_page

        # Erased already, or never known: nothing to erase.
        for cid in ("c-gone", "c-never"):
            missing = await client.delete(f"/conversations/{cid}")
            assert missing.status_code == 404, missing.text
            assert missing.json()["error"]["code"] == "not_found"
    assert tombstone(target, "c-never") is None


async def test_delete_needs_the_read_token(app_client: AppClient, target: str) -> None:
    async with app_client(**{"api.token": "read-s3cret"}) as client:
        await store(client, transcription_ready("c-guarded", turns=TURNS))
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = await client.delete("/conversations/c-guarded", headers=headers)
            assert refused.status_code == 401
        assert held(target, "c-guarded")["messages"] == TURNS + 1
        bad_id = await client.delete("/conversations/" + "x" * 300, headers={"Authorization": "Bearer read-s3cret"})
        assert bad_id.status_code == 422
        done = await client.delete("/conversations/c-guarded", headers={"Authorization": "Bearer read-s3cret"})
        assert done.status_code == 200, done.text
    assert held(target, "c-guarded") == dict.fromkeys(TABLES, 0)


@pytest.mark.parametrize("ack", ["durable", "enqueued"])
async def test_a_redelivery_after_erasure_is_answered_2xx_and_stays_erased(
    app_client: AppClient, target: str, ack: str
) -> None:
    first = transcription_ready("c-late", turns=TURNS)
    async with app_client(**{"ingest.ack": "durable"}) as client:
        await store(client, first)
        assert (await client.delete("/conversations/c-late")).status_code == 200
    async with app_client(**{"ingest.ack": ack}) as client:
        again = await client.post(WEBHOOK, content=encode(first))  # the same body
        new = await client.post(WEBHOOK, content=encode(envelope("c-late", "system.shutdown", {})))
        generic = await client.post("/conversations/c-late/messages", json={"role": "user", "content": "x"})
        for answer in (again, new, generic):
            if ack == "durable":
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"status": "erased", "received": answer.json()["received"]}
            else:
                assert answer.status_code == 202, answer.text
        await client.app.state.runtime.registry.close(timeout_s=10)  # type: ignore[attr-defined]
        assert (await client.get("/conversations/c-late")).status_code == 404
        scraped = (await client.get("/metrics")).text
    assert held(target, "c-late") == dict.fromkeys(TABLES, 0)
    assert tombstone(target, "c-late")[1] == 3  # type: ignore[index]
    assert metric(scraped, "transcriptd_erased_deliveries_dropped_total") == 3
    if ack == "durable":
        assert 'transcriptd_deliveries_total{event_type="application.transcription_ready",outcome="erased"} 1.0' in (
            scraped
        )


def delivery(cid: str, key: str) -> Record:
    row = (cid, "tavus", 0, "user", "hello", None, None, None, None, None, 1.0)
    return Record(
        key=key,
        source="tavus",
        event_type="application.transcription_ready",
        conversation_id=cid,
        received_at=time.time(),
        body=b"{}",
        rows=[row],
    )


def test_one_batch_drops_the_erased_conversations_and_stores_the_others(db_path: Path) -> None:
    conn = open_writer(db_path)
    try:
        migrate(conn)
        write_batch(conn, [delivery("c-a", "k-a0")])
        assert erasure.erase(conn, "c-a") is not None
        batch = [delivery("c-a", "k-a1"), delivery("c-b", "k-b1"), delivery("c-a", "k-a2"), delivery("c-c", "k-c1")]
        outcomes = write_batch(conn, batch)
    finally:
        conn.close()
    assert [getattr(o, "erased", None) for o in outcomes] == [True, False, True, False]
    assert [getattr(o, "inserted", None) for o in outcomes] == [0, 1, 0, 1]
    assert held(db_path, "c-a") == dict.fromkeys(TABLES, 0)
    assert held(db_path, "c-b") == {"messages": 1, "events": 1, "dead_letters": 0, "conversations": 1}
    assert tombstone(db_path, "c-a")[1] == 2  # type: ignore[index]
    assert rows(db_path, "SELECT last_dropped_at IS NOT NULL FROM tombstones") == [(1,)]


def test_tombstone_check_reads_many_ids_in_one_batch(db_path: Path) -> None:
    """More ids than one statement's chunk: every one is still checked."""
    conn = open_writer(db_path)
    try:
        migrate(conn)
        ids = [f"c-{n}" for n in range(1300)]
        conn.executemany("INSERT INTO tombstones (conversation_id, deleted_at) VALUES (?, 1)", [(i,) for i in ids[::7]])
        assert erasure.tombstoned(conn, ids) == set(ids[::7])
        assert erasure.tombstoned(conn, []) == set()
    finally:
        conn.close()


# --- the CLI ------------------------------------------------------------------------------------------


async def test_cli_delete_and_undo_against_a_real_file(app_client: AppClient, target: str, tmp_path: Path) -> None:
    async with app_client() as client:
        for cid in ("c-cli", "c-other"):
            await store(client, transcription_ready(cid, turns=TURNS))
    other = held(target, "c-other")

    done = transcriptd("delete", "--conversation", "c-cli", "--db", target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "erased conversation 'c-cli': 1 conversation, 5 messages, 1 events, 0 dead letters" in done.stdout
    assert held(target, "c-cli") == dict.fromkeys(TABLES, 0)
    assert held(target, "c-other") == other

    again = transcriptd("delete", "--conversation", "c-cli", "--db", target, cwd=tmp_path)
    assert again.returncode == 1
    assert "no conversation 'c-cli'" in again.stderr

    async with app_client() as client:
        dropped = await client.post(WEBHOOK, content=encode(transcription_ready("c-cli", turns=TURNS)))
        assert dropped.json()["status"] == "erased"

    undo = transcriptd("delete", "--undo", "--conversation", "c-cli", "--db", target, cwd=tmp_path)
    assert undo.returncode == 0, undo.stderr
    assert "1 deliveries dropped since" in undo.stdout
    assert tombstone(target, "c-cli") is None
    undo_again = transcriptd("delete", "--undo", "--conversation", "c-cli", "--db", target, cwd=tmp_path)
    assert undo_again.returncode == 1
    assert "no tombstone" in undo_again.stderr

    # Lifted: the next delivery is stored again (what the erasure deleted stays deleted).
    async with app_client() as client:
        await store(client, transcription_ready("c-cli", turns=TURNS))
    assert held(target, "c-cli")["messages"] == TURNS + 1

    missing_db = transcriptd("delete", "--conversation", "c-cli", "--db", str(tmp_path / "none.db"), cwd=tmp_path)
    assert missing_db.returncode == 1
    assert "no database" in missing_db.stderr


def test_delete_help_shows_every_option(tmp_path: Path) -> None:
    parser = subcommands()["delete"]
    text = help_text(tmp_path, "delete")
    for word in expected_words(parser):
        assert word in text
    assert "cache.ttl_s" in text


def test_delete_while_serve_runs(tmp_path: Path, target: str) -> None:
    """The CLI erases under a serving daemon (busy timeout, not an error); the daemon then drops the
    conversation's deliveries; its own DELETE evicts at once; everything else stays served."""
    with (
        managed(start_daemon(tmp_path / "serve", target)) as daemon,
        httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=30) as client,
    ):
        for cid in ("c-live-a", "c-live-b", "c-live-c"):
            assert client.post(WEBHOOK, content=encode(transcription_ready(cid, turns=TURNS))).status_code == 200
            assert client.get(f"/conversations/{cid}/messages").status_code == 200  # cached
        done = transcriptd("delete", "--conversation", "c-live-a", "--db", target, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert held(target, "c-live-a") == dict.fromkeys(TABLES, 0)

        late = client.post(WEBHOOK, content=encode(transcription_ready("c-live-a", turns=TURNS)))
        assert late.status_code == 200, late.text
        assert late.json()["status"] == "erased"
        assert held(target, "c-live-a") == dict.fromkeys(TABLES, 0)

        erased = client.delete("/conversations/c-live-b")
        assert erased.status_code == 200, erased.text
        assert client.get("/conversations/c-live-b/messages").status_code == 404
        assert client.get("/conversations/c-live-c/messages").json()["messages"]
        assert "dropped a 'application.transcription_ready' delivery for erased conversation" in daemon.log()
        assert daemon.stop() == 0
    assert held(target, "c-live-c")["messages"] == TURNS + 1
    assert tombstone(target, "c-live-a")[1] == 1  # type: ignore[index]


@pytest.mark.sqlite_only("freed pages of the database file and WAL checkpoints")
def test_erased_text_is_gone_from_the_file_once_checkpointed(db_path: Path) -> None:
    """Freed pages would keep the erased text in the file until reused: erasure zeroes it."""
    marker = "erase-me-" + "q" * 40
    conn = open_writer(db_path)
    try:
        migrate(conn)
        many = delivery("c-secret", "k-secret")
        row = many.rows[0]
        many = replace(many, rows=[(*row[:2], seq, "user", f"{marker} {seq}", *row[5:]) for seq in range(300)])
        write_batch(conn, [many, delivery("c-kept", "k-kept")])
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert marker.encode() in db_path.read_bytes()
        # Some builds of SQLite zero deleted cells by default, most do not: erasure does, either way.
        conn.execute("PRAGMA secure_delete = OFF")
        assert erasure.erase(conn, "c-secret") is not None
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA secure_delete").fetchone() == (0,)  # the writer's own setting is back
    finally:
        conn.close()
    assert marker.encode() not in db_path.read_bytes()
    assert held(db_path, "c-kept")["messages"] == 1
