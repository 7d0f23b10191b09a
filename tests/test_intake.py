"""The intake contract over HTTP: answers, error shape, auth, limits, the generic endpoint, concurrency."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import AppClient, locked
from tests.payloads import encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

Query = Any


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["status"] == status
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def test_malformed_json_is_400_and_stores_nothing(app_client: AppClient, db: Query) -> None:
    async with app_client() as client:
        for body in (
            b"{nope",
            b"",
            b'{"conversation_id": "c", "event_type": "x"',
            b'{"conversation_id": "\xff", "event_type": "x"}',
        ):
            error = assert_error_shape(await client.post("/webhooks/tavus", content=body), 400, "malformed_json")
            assert "JSON" in error["message"]
        response = await client.post("/conversations/c/messages", content=b"[{]")
        assert_error_shape(response, 400, "malformed_json")
    assert db("SELECT count(*) FROM events") == [(0,)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "$"),
        (b'{"event_type": "system.shutdown"}', "$"),
        (b'{"conversation_id": 5, "event_type": "system.shutdown"}', "$.conversation_id"),
        (b'{"conversation_id": "", "event_type": "system.shutdown"}', "$.conversation_id"),
        (b'{"conversation_id": "c", "event_type": "system.shutdown", "properties": []}', "$.properties"),
        (
            b'{"conversation_id": "c", "event_type": "application.transcription_ready", "properties": {}}',
            "$.properties",
        ),
        (
            b'{"conversation_id": "c", "event_type": "application.transcription_ready",'
            b' "properties": {"transcript": {"role": "user"}}}',
            "$.properties.transcript",
        ),
    ],
)
async def test_wrong_shape_is_422_with_the_field_path(app_client: AppClient, body: bytes, field: str) -> None:
    async with app_client() as client:
        error = assert_error_shape(await client.post("/webhooks/tavus", content=body), 422, "invalid_payload")
    assert error["field"] == field
    assert error["problems"][0]["field"] == field


async def test_body_over_the_limit_is_413(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-big", turns=200))
    async with app_client(**{"ingest.max_body_bytes": len(body) - 1}) as client:
        assert_error_shape(await client.post("/webhooks/tavus", content=body), 413, "payload_too_large")

        async def chunked() -> Any:  # no Content-Length: the limit holds while reading
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        assert_error_shape(await client.post("/webhooks/tavus", content=chunked()), 413, "payload_too_large")
        small = encode(transcription_ready("c-small", turns=2))
        assert (await client.post("/webhooks/tavus", content=small)).status_code == 200
    assert db("SELECT DISTINCT conversation_id FROM messages") == [("c-small",)]


async def test_token_guards_the_webhook(app_client: AppClient, db: Query, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = "t0ken-Secret-1234"
    body = encode(transcription_ready("c-auth", turns=1))
    async with app_client(**{"webhooks.tavus.token": token}) as client:
        assert_error_shape(await client.post("/webhooks/tavus", content=body), 401, "unauthorized")
        assert_error_shape(await client.post("/webhooks/tavus/wrong", content=body), 401, "unauthorized")
        assert_error_shape(await client.post(f"/webhooks/tavus/{token}x", content=body), 401, "unauthorized")
        assert db("SELECT count(*) FROM events") == [(0,)]
        assert (await client.post(f"/webhooks/tavus/{token}", content=body)).status_code == 200
    assert db("SELECT count(*) FROM messages") == [(2,)]
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert ours, "the daemon logged nothing at all: this check would pass vacuously"
    assert not [line for line in ours if token in line]


async def test_without_a_token_configured_a_token_path_is_refused(app_client: AppClient) -> None:
    async with app_client() as client:
        response = await client.post("/webhooks/tavus/anything", content=b"{}")
    assert_error_shape(response, 401, "unauthorized")


async def test_unknown_route_and_method_use_the_same_error_shape(app_client: AppClient) -> None:
    async with app_client() as client:
        assert_error_shape(await client.get("/nope"), 404, "not_found")
        assert_error_shape(await client.get("/webhooks/tavus"), 405, "method_not_allowed")


async def test_enqueued_mode_answers_202_and_stores(app_client: AppClient, db: Query) -> None:
    async with app_client(**{"ingest.ack": "enqueued"}) as client:
        response = await client.post("/webhooks/tavus", content=encode(transcription_ready("c-enq", turns=50)))
        assert response.status_code == 202
        assert response.json() == {"status": "enqueued", "received": 51, "rejected": 0}
    # Leaving the client ran the lifespan's shutdown: every mailbox was drained and committed.
    assert db("SELECT count(*) FROM messages WHERE conversation_id = 'c-enq'") == [(51,)]


async def test_generic_endpoint_appends_one_message_or_a_list(app_client: AppClient, db: Query) -> None:
    async with app_client() as client:
        one = await client.post("/conversations/live-1/messages", json={"role": "user", "content": "hi", "id": "m1"})
        many = await client.post(
            "/conversations/live-1/messages",
            json=[
                {"role": "assistant", "content": "hello!", "id": "m2", "timestamp": "2025-03-01T10:00:00Z"},
                {"role": "user", "content": "no id here", "timestamp": 1740823300.5},
            ],
        )
        again = await client.post("/conversations/live-1/messages", json={"role": "user", "content": "hi", "id": "m1"})
        edited = await client.post(
            "/conversations/live-1/messages", json={"role": "assistant", "content": "hello, edited", "id": "m2"}
        )
    assert one.json()["inserted"] == 1
    assert many.json()["inserted"] == 2
    assert (again.json()["inserted"], again.json()["duplicates"]) == (0, 1)
    assert (edited.json()["inserted"], edited.json()["updated"]) == (0, 1)
    assert db("SELECT seq, role, content, external_id, timestamp FROM messages ORDER BY seq") == [
        (0, "user", "hi", "m1", None),
        (1, "assistant", "hello, edited", "m2", 1740823200.0),
        (2, "user", "no id here", None, 1740823300.5),
    ]
    assert db("SELECT source, message_count FROM conversations") == [("api", 3)]


async def test_generic_retry_of_the_same_body_is_not_stored_twice(app_client: AppClient, db: Query) -> None:
    body = b'{"role": "user", "content": "ok"}'
    async with app_client() as client:
        await client.post("/conversations/c/messages", content=body)
        retry = await client.post("/conversations/c/messages", content=body)
        keyed = [
            await client.post("/conversations/c/messages", content=body, headers={"Idempotency-Key": f"k{i}"})
            for i in (1, 2, 1)
        ]
    assert retry.json()["duplicates"] == 1
    assert [r.json()["inserted"] for r in keyed] == [1, 1, 0]
    assert db("SELECT count(*) FROM messages") == [(3,)]


async def test_generic_bad_items_are_named_and_good_ones_stored(app_client: AppClient, db: Query) -> None:
    async with app_client() as client:
        response = await client.post(
            "/conversations/c-gen/messages",
            json=[{"role": "user", "content": "a"}, {"role": "user"}, {"role": "user", "content": "c", "id": ""}],
        )
        too_long = await client.post("/conversations/" + "x" * 300 + "/messages", json={"role": "u", "content": "a"})
    error = assert_error_shape(response, 422, "invalid_payload")
    assert [p["field"] for p in error["problems"]] == ["$[1]", "$[2].id"]
    assert db("SELECT content FROM messages") == [("a",)]
    assert assert_error_shape(too_long, 422, "invalid_payload")["field"] == "path.conversation_id"


async def test_concurrent_re_deliveries_leave_exactly_one_copy(app_client: AppClient, db: Query) -> None:
    bodies = [encode(transcription_ready(f"c-{i}", turns=30, seed=i)) for i in range(12)]
    answers: list[dict[str, Any]] = []

    async with app_client() as client:

        async def send(body: bytes) -> None:
            response = await client.post("/webhooks/tavus", content=body)
            assert response.status_code == 200
            answers.append(response.json())

        async with anyio.create_task_group() as tg:
            for _ in range(4):  # every transcript four times, all at once
                for body in bodies:
                    tg.start_soon(send, body)
    assert db("SELECT count(*), count(DISTINCT conversation_id) FROM messages") == [(12 * 31, 12)]
    assert sum(a["inserted"] for a in answers) == 12 * 31
    assert sum(a["duplicates"] for a in answers) == 3 * 12 * 31
    assert db("SELECT count(*) FROM events") == [(12,)]


async def test_a_full_mailbox_answers_503_with_retry_after(app_client: AppClient, db: Query) -> None:
    settings = {"ingest.mailbox_size": 1, "ingest.ack": "enqueued", "ingest.retry_after_s": 7}
    bodies = [encode(envelope("c-busy", "application.perception_analysis", {"analysis": str(i)})) for i in range(40)]
    async with app_client(**settings) as client:
        answers = []

        async def send(body: bytes) -> None:
            answers.append(await client.post("/webhooks/tavus", content=body))

        async with anyio.create_task_group() as tg:
            for body in bodies:
                tg.start_soon(send, body)
    refused = [r for r in answers if r.status_code == 503]
    accepted = [r for r in answers if r.status_code == 202]
    assert refused, "one conversation with a mailbox of 1 took 40 deliveries at once"
    assert len(refused) + len(accepted) == 40
    for response in refused:
        assert response.headers["retry-after"] == "7"
        assert_error_shape(response, 503, "overloaded")
    # Everything answered 202 was stored; nothing refused was.
    assert db("SELECT count(*) FROM events") == [(len(accepted),)]


async def test_livez_and_readyz(app_client: AppClient) -> None:
    async with app_client() as client:
        assert (await client.get("/livez")).json() == {"status": "alive"}
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["writer"] == "running"


@pytest.mark.parametrize("path", ["/webhooks/tavus", "/conversations/c/messages"])
async def test_deeply_nested_json_is_400_not_500(app_client: AppClient, path: str) -> None:
    deep = b'{"conversation_id": "c", "event_type": "x", "role": "u", "content": "c", "extra": ' + b"[" * 5000
    deep += b"]" * 5000 + b"}"
    async with app_client() as client:
        response = await client.post(path, content=deep)
        nested_item = await client.post("/conversations/c/messages", content=b"[" + b"[" * 5000 + b"]" * 5000 + b"]")
    assert response.status_code in (400, 422), response.text
    assert nested_item.status_code in (400, 422), nested_item.text


async def test_memory_budget_refuses_with_503_before_it_is_exceeded(
    app_client: AppClient, target: str, db: Query
) -> None:
    bodies = [encode(transcription_ready(f"c-mem-{i}", turns=100, seed=i)) for i in range(40)]
    settings = {"ingest.ack": "enqueued", "ingest.max_inflight_mib": 1, "storage.busy_timeout_ms": 0}
    async with app_client(**settings) as client:
        with locked(target):  # nothing can be committed: everything accepted stays in memory
            answers = [await client.post("/webhooks/tavus", content=body) for body in bodies]
            registry = client.app.state.runtime.registry  # type: ignore[attr-defined]
            assert registry.inflight_bytes <= 1024 * 1024
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code == 503]
    assert accepted
    assert refused
    assert {r.json()["error"]["code"] for r in refused} == {"overloaded"}
    # The lock is gone and the shutdown drained: everything accepted was stored.
    assert db("SELECT count(DISTINCT conversation_id) FROM messages") == [(len(accepted),)]


async def test_message_budget_refuses_with_503(app_client: AppClient, target: str, db: Query) -> None:
    settings = {"ingest.ack": "enqueued", "ingest.max_inflight_messages": 150, "storage.busy_timeout_ms": 0}
    async with app_client(**settings) as client:
        with locked(target):  # nothing commits: every accepted message stays in flight
            answers = [
                await client.post("/webhooks/tavus", content=encode(transcription_ready(f"c-n-{i}", turns=99)))
                for i in range(4)
            ]
    assert [a.status_code for a in answers] == [202, 503, 503, 503]
    assert "messages are waiting" in answers[1].json()["error"]["message"]
    assert answers[1].headers["retry-after"]
    assert db("SELECT count(*) FROM messages") == [(100,)]


async def test_a_commit_that_outlasts_the_ack_timeout_is_answered_503_and_still_stored(
    app_client: AppClient, target: str, db: Query
) -> None:
    body = encode(transcription_ready("c-late", turns=3))
    async with app_client(**{"ingest.ack_timeout_s": 0.1, "ingest.retry_after_s": 3}) as client:
        with locked(target):  # another process holds the database: the commit waits for it
            late = await client.post("/webhooks/tavus", content=body)
        retry = await client.post("/webhooks/tavus", content=body)
    assert late.status_code == 503
    assert late.headers["retry-after"] == "3"
    assert late.json()["error"]["code"] == "commit_timeout"
    # It stayed queued and was committed once the lock went: the sender's retry is a duplicate.
    assert retry.status_code == 200
    assert retry.json()["inserted"] == 0
    assert db("SELECT count(*) FROM messages WHERE conversation_id = 'c-late'") == [(4,)]
