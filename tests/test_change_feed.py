"""The outbox and the change feed on real SQLite files: the group commit recording one change per
conversation per commit, and ``GET /changes`` through the in-process app (long-polls woken by a commit)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from storage.connection import open_writer
from storage.deliveries import ConversationPatch, MessageRow, Record, WriteResult
from storage.migrations import migrate
from storage.writes import commit_batch
from tests.conftest import AppClient, execute
from tests.daemon_process import WEBHOOK, rows, transcriptd
from tests.payloads import encode, envelope, transcription_ready
from tests.test_dead_letters import cure, poison, poisoned_body

TURNS = 3  # and the system entry: 4 messages per transcript


def delivery(key: str, cid: str, seqs: list[int], *, content: str = "hi", status: Any = None) -> Record:
    now = time.time()
    message_rows: list[MessageRow] = [
        (cid, "test", seq, "user", f"{content} {seq}", None, None, None, None, None, now) for seq in seqs
    ]
    return Record(
        key=key,
        source="test",
        event_type="test",
        conversation_id=cid,
        received_at=now,
        body=b"{}",
        rows=message_rows,
        patch=ConversationPatch(status=status),
    )


def changes_in(db_path: Path | str) -> list[tuple[Any, ...]]:
    return rows(db_path, "SELECT position, conversation_id, status, kinds, first_seq, last_seq FROM changes ORDER BY 1")


def test_a_commit_records_one_change_per_conversation_however_many_deliveries_it_held(db_path: Path) -> None:
    conn = open_writer(db_path)
    migrate(conn)
    try:
        # Three deliveries of one conversation and one of another, in one commit (the fast path).
        batch = [delivery("a", "c1", [0, 1, 2]), delivery("b", "c1", [3, 4]), delivery("c", "c2", [0])]
        batch.append(delivery("d", "c1", [5], status="ended"))
        _, position = commit_batch(conn, batch)
        assert changes_in(db_path) == [
            (1, "c1", "ended", '{"messages_added":6,"created":1,"status":1}', 0, 5),
            (2, "c2", "active", '{"messages_added":1,"created":1,"status":1}', 0, 0),
        ]
        assert position == 2
        # A re-delivery (same key) and a repeat of stored rows under a new key change nothing: nothing recorded.
        _, position = commit_batch(conn, [delivery("a", "c1", [0, 1, 2]), delivery("e", "c2", [0])])
        assert position is None
        assert len(changes_in(db_path)) == 2
        # The savepoint path (rows already there): one change, counting only what changed, with its seq range.
        batch = [delivery("f", "c1", [4, 5, 6], content="changed"), delivery("g", "c1", [7, 8])]
        _, position = commit_batch(conn, batch)
        assert position == 3
        assert changes_in(db_path)[-1] == (3, "c1", "ended", '{"messages_added":3,"messages_updated":2}', 4, 8)
    finally:
        conn.close()


def test_a_refused_delivery_records_nothing_and_the_rest_of_its_commit_does(db_path: Path) -> None:
    conn = open_writer(db_path)
    migrate(conn)
    try:
        refused = delivery("bad", "c-bad", [0], content="\ud800")  # a lone surrogate: refused at bind time
        outcomes, _ = commit_batch(conn, [refused, delivery("ok", "c-ok", [0, 1])])
        assert [type(o).__name__ for o in outcomes] == ["StorageRejected", "WriteResult"]
        assert [(cid, kinds) for _, cid, _, kinds, _, _ in changes_in(db_path)] == [
            ("c-ok", '{"messages_added":2,"created":1,"status":1}')
        ]
    finally:
        conn.close()


def test_recording_off_records_nothing(db_path: Path) -> None:
    conn = open_writer(db_path)
    migrate(conn)
    try:
        outcomes, position = commit_batch(conn, [delivery("a", "c1", [0, 1])], record_changes=False)
        assert position is None
        assert isinstance(outcomes[0], WriteResult)
        assert outcomes[0].inserted == 2
        assert changes_in(db_path) == []
    finally:
        conn.close()


async def store(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post(WEBHOOK, content=encode(body))
    assert response.status_code == 200, response.text


async def feed(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/changes", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


@pytest.mark.anyio
async def test_pages_follow_next_and_next_stays_put_when_nothing_came(app_client: AppClient) -> None:
    async with app_client() as client:
        for n in range(5):
            await store(client, transcription_ready(f"feed-{n}", turns=TURNS))
        recording = {"storage_provider": "gcs", "storage_uri": "gs://b/r.mp4"}
        await store(client, envelope("feed-0", "application.recording_ready", recording))
        first = await feed(client, limit=4)
        assert [c["position"] for c in first["changes"]] == [1, 2, 3, 4]
        assert first["next"] == 4
        change = first["changes"][0]
        assert change["id"] == "chg_1"
        assert change["conversation_id"] == "feed-0"
        assert change["source"] == "tavus"
        assert change["changed"] == {"messages_added": TURNS + 1, "created": 1, "status": 1}
        assert change["status"] == "ended"  # a Tavus transcript ends its conversation
        assert (change["first_seq"], change["last_seq"]) == (0, TURNS)
        assert change["url"] == "/conversations/feed-0"
        second = await feed(client, after=first["next"], limit=4)
        assert [c["position"] for c in second["changes"]] == [5, 6]
        assert second["changes"][-1]["changed"] == {"recording": 1}
        assert (second["changes"][-1]["first_seq"], second["changes"][-1]["last_seq"]) == (None, None)
        assert second["next"] == 6
        empty = await feed(client, after=second["next"])
        assert empty == {"changes": [], "next": 6}
        # An id that needs quoting in a path is quoted in the change's url.
        await client.post("/conversations/a%2Fb%20c/messages", json={"role": "user", "content": "hi"})
        (appended,) = (await feed(client, after=6))["changes"]
        assert appended["url"] == "/conversations/a%2Fb%20c"
        assert appended["source"] == "api"
        assert appended["changed"]["messages_added"] == 1


@pytest.mark.anyio
async def test_a_long_poll_is_woken_by_a_commit(app_client: AppClient) -> None:
    async with app_client() as client:
        await store(client, transcription_ready("before", turns=TURNS))
        answer: dict[str, Any] = {}

        async def poll() -> None:
            # 60 s: were it the timeout that ended it, the answer would hold no change.
            answer.update(await feed(client, after=1, wait=60))

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            # Until the poll is waiting on the signal (no sleep-and-hope: the signal counts its waiters).
            changes_signal = client.app.state.changes_signal  # type: ignore[attr-defined]
            while not changes_signal.awaited:  # noqa: ASYNC110 (the signal has no event for its waiters)
                await anyio.sleep(0.01)
            await store(client, transcription_ready("during", turns=TURNS))
        assert [c["conversation_id"] for c in answer["changes"]] == ["during"]
        assert answer["next"] == 2


@pytest.mark.anyio
async def test_bad_parameters_are_422_naming_the_parameter(app_client: AppClient) -> None:
    async with app_client(**{"changes.max_wait_s": 0.05}) as client:
        for params, field in [
            ({"after": "-1"}, "query.after"),
            ({"after": "x"}, "query.after"),
            ({"limit": "0"}, "query.limit"),
            ({"limit": "100000"}, "query.limit"),
            ({"wait": "3601"}, "query.wait"),
            ({"wait": "-1"}, "query.wait"),
            ({"after": str(2**64)}, "query.after"),
        ]:
            response = await client.get("/changes", params=params)
            assert response.status_code == 422, (params, response.text)
            assert response.json()["error"]["field"] == field, (params, response.text)
        # Longer than changes.max_wait_s: it waits that long (here 0.05 s), and answers what there is.
        assert await feed(client, wait=3600) == {"changes": [], "next": 0}
        response = await client.get("/changes", params={"bogus": "1"})
        assert response.status_code == 422, response.text
        response = await client.get("/changes/stream", headers={"Last-Event-ID": "not-a-position"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "header.Last-Event-ID"


@pytest.mark.anyio
async def test_head_of_the_stream_answers_its_headers_and_ends(app_client: AppClient) -> None:
    async with app_client() as client:
        response = await client.head("/changes/stream", params={"after": 0})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.content == b""
        assert (await client.head("/changes/stream", params={"after": -1})).status_code == 422


@pytest.mark.anyio
async def test_the_feed_needs_the_api_token(app_client: AppClient) -> None:
    async with app_client(**{"api.token": "read-token"}) as client:
        for path in ("/changes", "/changes/stream"):
            response = await client.get(path)
            assert response.status_code == 401, response.text
            response = await client.get(path, headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 401, response.text
        response = await client.get("/changes", headers={"Authorization": "Bearer read-token"})
        assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_erasure_deletes_the_changes_and_records_one_erased(app_client: AppClient, target: str) -> None:
    async with app_client() as client:
        await store(client, transcription_ready("gone", turns=TURNS))
        await store(client, transcription_ready("kept", turns=TURNS))
        await store(client, envelope("gone", "system.shutdown", {"shutdown_reason": "done"}))
        assert (await client.delete("/conversations/gone")).status_code == 200
        page = await feed(client)
        assert [(c["position"], c["conversation_id"], c["status"], c["changed"]) for c in page["changes"]] == [
            (2, "kept", "ended", {"messages_added": TURNS + 1, "created": 1, "status": 1}),
            (4, "gone", None, {"erased": 1}),
        ]
        # A delivery dropped for the erased conversation records nothing; a second erasure finds nothing.
        await store(client, transcription_ready("gone", turns=TURNS, seed=1))
        assert (await client.delete("/conversations/gone")).status_code == 404
        assert (await feed(client, after=4))["changes"] == []
        assert len(changes_in(target)) == 2


@pytest.mark.anyio
async def test_operator_commands_record_their_changes(app_client: AppClient, target: str, tmp_path: Path) -> None:
    async with app_client() as client:
        poison(target)  # the schema exists once the app has started
        await store(client, transcription_ready("op-a", turns=TURNS))
        await store(client, transcription_ready("op-b", turns=TURNS))
        refused = await client.post(WEBHOOK, content=poisoned_body("op-poison"))
        assert refused.status_code >= 500
    assert [cid for _, cid, *_ in changes_in(target)] == ["op-a", "op-b"]
    db = target

    # A replay that re-derives what is stored changes nothing, and records nothing.
    replayed = transcriptd("replay", "--db", db, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert len(changes_in(target)) == 2
    # One that puts back lost messages records them.
    execute(target, "DELETE FROM messages WHERE conversation_id = 'op-a' AND seq >= 2")
    replayed = transcriptd("replay", "--conversation", "op-a", "--db", db, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert changes_in(target)[-1][1:] == ("op-a", "ended", f'{{"messages_added":{TURNS - 1}}}', 2, TURNS)

    # A dead letter retried once its cause is gone: its conversation's first change.
    cure(target)
    retried = transcriptd("dead-letters", "retry", "--db", db, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert changes_in(target)[-1][1:4] == ("op-poison", "ended", '{"messages_added":5,"created":1,"status":1}')

    # The CLI's erasure: the conversation's changes go, and one {"erased": 1} is left.
    deleted = transcriptd("delete", "--conversation", "op-b", "--db", db, cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert [(cid, status, kinds) for _, cid, status, kinds, _, _ in changes_in(target) if cid == "op-b"] == [
        ("op-b", None, '{"erased":1}')
    ]
