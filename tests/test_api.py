"""The read API over HTTP: pagination, filters, auth, errors, read-your-writes through the cache, OpenAPI."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.routing import Route

from daemon.routes import ROUTES
from tests.conftest import AppClient
from tests.payloads import encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

# Between two reads of one reader in the read-your-writes race: twelve readers leave the loop idle most
# of the time (see keep_reading).
READ_PAUSE_S = 0.01


async def all_pages(client: httpx.AsyncClient, first: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    url: str | None = first
    while url is not None:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["messages"]
        url = page["next"]
    return seen


@pytest.mark.parametrize("turns", [0, 1, 50, 51, 1000])
async def test_every_message_exactly_once_in_order_across_pages_and_cursors(app_client: AppClient, turns: int) -> None:
    body = transcription_ready("c-pages", turns=turns)
    expected = [e["content"] for e in body["properties"]["transcript"][1:]]  # system entries are left out
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(body))).status_code == 200
        for limit in (1, 7, 50, 500):
            if limit == 1 and turns > 60:
                continue  # a thousand requests of one message each prove nothing more
            by_page = await all_pages(client, f"/conversations/c-pages/messages?limit={limit}")
            by_cursor = await all_pages(client, f"/conversations/c-pages/messages?limit={limit}&after=-1")
            assert [m["content"] for m in by_page] == expected
            assert [m["content"] for m in by_cursor] == expected
            assert [m["seq"] for m in by_cursor] == list(range(1, turns + 1))
        with_system = await all_pages(client, "/conversations/c-pages/messages?include_system=true&limit=500")
    assert [m["seq"] for m in with_system] == list(range(turns + 1))


async def test_role_filter_and_page_fields(app_client: AppClient) -> None:
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(transcription_ready("c-roles", turns=10)))
        users = (await client.get("/conversations/c-roles/messages?role=user&limit=3")).json()
        system = (await client.get("/conversations/c-roles/messages?role=system")).json()
    assert [m["role"] for m in users["messages"]] == ["user"] * 3
    assert users["page"] == 1
    assert users["next"] == "/conversations/c-roles/messages?limit=3&page=2&role=user"
    assert [m["seq"] for m in system["messages"]] == [0]


async def test_conversation_record(app_client: AppClient) -> None:
    events = [
        envelope("c-rec", "system.replica_joined", {"replica_id": "r-1"}),
        envelope("c-rec", "application.recording_ready", {"storage_provider": "gcs", "storage_uri": "gs://b/r.mp4"}),
        envelope("c-rec", "application.post_call_action_executed", {"tool_name": "crm", "status": "ok", "request": {}}),
        envelope("c-rec", "system.shutdown", {"shutdown_reason": "end_call"}),
    ]
    async with app_client() as client:
        for event in events:
            assert (await client.post("/webhooks/tavus", content=encode(event))).status_code == 200
        record = (await client.get("/conversations/c-rec")).json()
    assert record["status"] == "ended"
    assert record["replica_id"] == "r-1"
    assert record["shutdown_reason"] == "end_call"
    assert record["recording"] == {"uri": "gs://b/r.mp4", "provider": "gcs"}
    assert [a["tool_name"] for a in record["post_call_actions"]] == ["crm"]
    assert record["started_at"] is not None
    assert record["ended_at"] is not None


async def test_conversations_newest_activity_first_with_a_cursor(app_client: AppClient) -> None:
    async with app_client() as client:
        for i in range(7):
            await client.post(f"/conversations/list-{i}/messages", json={"role": "user", "content": "hi"})
        await client.post("/conversations/list-2/messages", json={"role": "user", "content": "again"})
        ids: list[str] = []
        url: str | None = "/conversations?limit=3"
        while url is not None:
            page = (await client.get(url)).json()
            ids += [c["id"] for c in page["conversations"]]
            url = page["next"]
    assert ids == ["list-2", "list-6", "list-5", "list-4", "list-3", "list-1", "list-0"]


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        ("/conversations/nope", 404, None),
        ("/conversations/nope/messages", 404, None),
        ("/conversations/c-q/messages?limit=0", 422, "query.limit"),
        ("/conversations/c-q/messages?limit=501", 422, "query.limit"),
        ("/conversations/c-q/messages?limit=ten", 422, "query.limit"),
        ("/conversations/c-q/messages?page=0", 422, "query.page"),
        ("/conversations/c-q/messages?page=45660257608191961", 422, "query.page"),  # its offset overflows SQLite
        ("/conversations/c-q/messages?after=9223372036854775808", 422, "query.after"),  # 2**63
        ("/conversations/c-q/messages?page=2&after=3", 422, "query.after"),
        ("/conversations/c-q/messages?colour=red", 422, "query"),
        ("/conversations/c-q/messages?include_system=maybe", 422, "query.include_system"),
        ("/conversations/c-q/messages?source=foo", 422, "query.source"),
        ("/conversations/c-q/messages?source=API", 422, "query.source"),
        ("/conversations?cursor=%%%", 422, "query.cursor"),
        ("/conversations?limit=-1", 422, "query.limit"),
    ],
)
async def test_bad_reads_are_named(app_client: AppClient, url: str, status: int, field: str | None) -> None:
    async with app_client() as client:
        await client.post("/conversations/c-q/messages", json={"role": "user", "content": "x"})
        response = await client.get(url)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if field is not None:
        assert error["field"] == field


async def test_api_token_guards_reads_and_the_generic_endpoint(app_client: AppClient) -> None:
    token = "read-s3cret"
    async with app_client(**{"api.token": token}) as client:
        post = await client.post("/conversations/c-t/messages", json={"role": "user", "content": "x"})
        assert post.status_code == 401
        assert post.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {token}"}
        ok = await client.post("/conversations/c-t/messages", json={"role": "user", "content": "x"}, headers=good)
        assert ok.status_code == 200
        for url in ("/conversations", "/conversations/c-t", "/conversations/c-t/messages"):
            assert (await client.get(url)).status_code == 401
            assert (await client.get(url, headers={"Authorization": "Bearer nope"})).status_code == 401
            assert (await client.get(url, headers=good)).status_code == 200
        # The webhook keeps its own auth, and health stays open for probes.
        assert (await client.get("/readyz")).status_code == 200
        hook = await client.post("/webhooks/tavus", content=encode(transcription_ready("c-t2", turns=1)))
        assert hook.status_code == 200


async def test_read_your_writes_with_a_warm_cache_under_concurrency(app_client: AppClient) -> None:
    """Many conversations, each read (warming the cache), then written while readers keep reading: any
    read that starts after a write was answered 200 sees every message of that write."""
    conversations = [f"ryw-{i}" for i in range(12)]
    async with app_client() as client:

        async def count(cid: str) -> int:
            response = await client.get(f"/conversations/{cid}/messages?limit=500&include_system=true")
            return len(response.json()["messages"])

        for cid in conversations:
            await client.post(f"/conversations/{cid}/messages", json={"role": "user", "content": "first"})
            assert await count(cid) == 1  # now cached

        stop = anyio.Event()

        async def keep_reading(cid: str) -> None:
            while not stop.is_set():
                await count(cid)  # races the writes below, filling the cache as it can
                # A cache hit over ASGI never suspends, and the writer is a thread that needs the GIL back
                # after every SQLite call. Readers that only yield (a checkpoint) keep the loop's ready
                # queue full: it never sleeps in its poll, and lets go of the GIL only for moments the
                # writer rarely wins, so a commit took seconds and the acks timed out (503). Without
                # sniffio installed this was hidden: httpx's ASGITransport tries to import it on every
                # request, and each failed import's stat calls let go of the GIL. A real server's reads
                # wait on their sockets; the pause gives the loop the same idle moments, while reads still
                # come about every millisecond, racing each commit.
                await anyio.sleep(READ_PAUSE_S)

        async def write_then_read(cid: str, round_: int) -> None:
            body = [{"role": "user", "content": f"{cid}-{round_}-{n}"} for n in range(5)]
            answer = await client.post(f"/conversations/{cid}/messages", json=body)
            assert answer.status_code == 200
            assert await count(cid) == 1 + 5 * (round_ + 1), f"{cid} read stale data after its ack"

        async with anyio.create_task_group() as readers:
            for cid in conversations:
                readers.start_soon(keep_reading, cid)
            for round_ in range(6):
                async with anyio.create_task_group() as writers:
                    for cid in conversations:
                        writers.start_soon(write_then_read, cid, round_)
            stop.set()
        cache = client.app.state.runtime.cache  # type: ignore[attr-defined]
        assert cache.hits > 0, "the cache was never used: this test would prove nothing"


async def test_openapi_describes_every_route_and_only_those(app_client: AppClient) -> None:
    async with app_client() as client:
        spec = (await client.get("/openapi.json")).json()
    # Each path is routed with and without a trailing slash; the description names it once, without.
    routes = {
        (r.path.removesuffix("/"), method.lower()) for r in ROUTES if isinstance(r, Route) for method in r.methods or ()
    }
    routes.discard(("/livez", "head"))
    routes = {(path, method) for path, method in routes if method != "head"}
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert described == routes
    messages = spec["paths"]["/conversations/{conversation_id}/messages"]
    assert {p["name"] for p in messages["get"]["parameters"]} >= {"conversation_id", "limit", "page", "after", "role"}
    stored = messages["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    # Stored, or Dropped when the conversation was erased: both tagged by `status`.
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in stored["anyOf"]} == {"Stored", "Dropped"}
    assert set(spec["components"]["schemas"]["Stored"]["properties"]) >= {"received", "inserted", "duplicates"}
    assert "422" in spec["paths"]["/webhooks/tavus"]["post"]["responses"]
