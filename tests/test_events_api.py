"""``GET /conversations/{id}/events``: the delivery timeline over HTTP, on a real database, with a real refusal
(a trigger) for the ``failed`` entries."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from daemon.ids import quoted
from tests.conftest import TEST_SECRETS, AppClient
from tests.payloads import encode, envelope, transcription_ready
from tests.test_dead_letters import poison, poisoned_body

pytestmark = pytest.mark.anyio

WEBHOOK_URL_TOKEN = "s3cr3t-callback-token"  # echoed in every Tavus body's webhook_url (bench/payloads.py)
assert WEBHOOK_URL_TOKEN in TEST_SECRETS


async def timeline(client: httpx.AsyncClient, first: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    url: str | None = first
    for _ in range(100):  # bounded: a cursor that loops fails the test instead of hanging it
        if url is None:
            return entries
        response = await client.get(url)
        assert response.status_code == 200, (url, response.text)
        entries += response.json()["events"]
        url = response.json()["next"]
    raise AssertionError("the timeline did not end")


async def test_the_timeline_lists_each_delivery_once_in_arrival_order(app_client: AppClient) -> None:
    partial = transcription_ready("c-tl", turns=3)
    partial["properties"]["transcript"][1]["role"] = 7  # one bad entry: a 422 whose valid part is stored
    bodies = [
        encode(envelope("c-tl", "system.replica_joined", {"replica_id": "r-1"})),
        encode(partial),
        encode(envelope("c-tl", "system.shutdown", {"shutdown_reason": "end_call"})),
    ]
    async with app_client() as client:
        answers = [await client.post("/webhooks/tavus", content=body) for body in bodies]
        repeat = await client.post("/webhooks/tavus", content=bodies[2])  # a duplicate adds no entry
        await client.post("/conversations/c-other/messages", json={"role": "user", "content": "not mine"})
        by_one = await timeline(client, "/conversations/c-tl/events?limit=1")
        whole = (await client.get("/conversations/c-tl/events")).json()
    assert [a.status_code for a in answers] == [200, 422, 200]
    assert repeat.json()["duplicate"] is True
    assert by_one == whole["events"]
    assert whole["conversation_id"] == "c-tl"
    assert whole["next"] is None
    assert [e["event_type"] for e in by_one] == [
        "system.replica_joined",
        "application.transcription_ready",
        "system.shutdown",
    ]
    assert [e["outcome"] for e in by_one] == ["stored", "partial", "stored"]
    assert by_one[1]["problems"] == 1
    assert [e["size"] for e in by_one] == [len(b) for b in bodies]
    assert all(e["source"] == "tavus" and e["delivery_key"].startswith("tavus:") for e in by_one)
    assert all("body" not in e for e in by_one)
    times = [e["received_at"] for e in by_one]
    assert times == sorted(times)


async def test_bodies_only_on_request_with_the_callback_secret_masked(app_client: AppClient) -> None:
    body = encode(transcription_ready("c-body", turns=2))
    assert WEBHOOK_URL_TOKEN.encode() in body
    async with app_client(**{"api.token": "read-s3cret"}) as client:
        await client.post("/webhooks/tavus", content=body)
        unauthorized = await client.get("/conversations/c-body/events")
        headers = {"Authorization": "Bearer read-s3cret"}
        shown = (await client.get("/conversations/c-body/events?include_body=true", headers=headers)).json()
    assert unauthorized.status_code == 401
    (entry,) = shown["events"]
    assert WEBHOOK_URL_TOKEN not in entry["body"]
    stored = json.loads(body)
    shown_body = json.loads(entry["body"])
    assert shown_body["webhook_url"] == "[redacted]"
    assert shown_body["properties"] == stored["properties"]


async def test_a_refused_delivery_appears_as_failed(app_client: AppClient, target: str) -> None:
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(envelope("c-poison", "system.replica_joined", {})))
        poison(target)
        refused = await client.post("/webhooks/tavus", content=poisoned_body("c-poison"))
        entries = await timeline(client, "/conversations/c-poison/events?limit=1")
        # A conversation whose only delivery was refused has no record, but its timeline shows the refusal.
        await client.post("/webhooks/tavus", content=poisoned_body("c-poison-only"))
        record = await client.get("/conversations/c-poison-only")
        only_failed = (await client.get("/conversations/c-poison-only/events")).json()["events"]
    assert refused.status_code >= 500
    assert [e["outcome"] for e in entries] == ["stored", "failed"]
    assert entries[1]["event_type"] == "application.transcription_ready"
    assert "poisoned row" in entries[1]["error"]
    assert entries[1]["attempts"] == 1
    assert record.status_code == 404
    assert [e["outcome"] for e in only_failed] == ["failed"]


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        ("/conversations/nobody/events", 404, None),
        ("/conversations/c-ev/events?limit=0", 422, "query.limit"),
        ("/conversations/c-ev/events?cursor=%%%", 422, "query.cursor"),
        ("/conversations/c-ev/events?include_body=maybe", 422, "query.include_body"),
        ("/conversations/c-ev/events?colour=red", 422, "query"),
        ("/conversations/%FF/events", 400, "path.conversation_id"),
    ],
)
async def test_bad_timeline_reads_are_named(app_client: AppClient, url: str, status: int, field: str | None) -> None:
    async with app_client() as client:
        await client.post("/conversations/c-ev/messages", json={"role": "user", "content": "x"})
        response = await client.get(url)
    assert response.status_code == status, response.text
    assert response.json()["error"].get("field") == field


@pytest.mark.parametrize("cursor", [[0.0, 0, 2**63], [0.0, 2, 1], [0.0, 0, -1], ["x", 0, 1]])
async def test_a_forged_cursor_is_a_422_not_a_500(app_client: AppClient, cursor: list[Any]) -> None:
    forged = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()
    async with app_client() as client:
        await client.post("/conversations/c-ev/messages", json={"role": "user", "content": "x"})
        response = await client.get(f"/conversations/c-ev/events?cursor={forged}")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "query.cursor"


async def test_next_links_of_an_odd_id_are_followable(app_client: AppClient) -> None:
    cid = "a/b?c#d%e f"
    async with app_client() as client:
        for i in range(3):
            await client.post(f"/conversations/{quoted(cid)}/messages", json={"role": "user", "content": str(i)})
        first = (await client.get(f"/conversations/{quoted(cid)}/events?limit=2&include_body=true")).json()
        entries = await timeline(client, f"/conversations/{quoted(cid)}/events?limit=1&include_body=true")
    assert first["next"].startswith(f"/conversations/{quoted(cid)}/events?limit=2&cursor=")
    assert first["next"].endswith("&include_body=true")
    assert [json.loads(e["body"])["content"] for e in entries] == ["0", "1", "2"]
