"""Callback metadata through the real app on a real SQLite file: the webhook URL's query parameters are
stored, merged key by key, bounded, returned by the read API, and filter ``GET /conversations`` together
with status, source and updated_since, across pages."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from daemon.metadata import MAX_KEYS, MAX_VALUE_LENGTH
from storage.backend import is_postgres_url
from tests.conftest import AppClient
from tests.daemon_process import WEBHOOK, rows
from tests.payloads import encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio


async def post(client: httpx.AsyncClient, body: dict[str, Any], query: str = "") -> httpx.Response:
    return await client.post(f"{WEBHOOK}?{query}" if query else WEBHOOK, content=encode(body))


async def listed(client: httpx.AsyncClient, url: str) -> tuple[list[str], list[str | None]]:
    """Every conversation id over all pages from ``url``, and each page's ``next``."""
    ids: list[str] = []
    links: list[str | None] = []
    next_url: str | None = url
    for _ in range(100):
        if next_url is None:
            return ids, links
        response = await client.get(next_url)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [c["id"] for c in page["conversations"]]
        next_url = page["next"]
        links.append(next_url)
    raise AssertionError("more than 100 pages")


async def test_metadata_is_stored_merged_and_returned(app_client: AppClient, target: str) -> None:
    async with app_client() as client:
        first = await post(client, transcription_ready("c-meta", turns=2), "user_id=42&plan=pro")
        assert first.status_code == 200, first.text
        record = (await client.get("/conversations/c-meta")).json()
        assert record["metadata"] == {"user_id": "42", "plan": "pro"}
        # Key by key: a later value replaces, other keys stay; a delivery without parameters changes nothing.
        second = await post(client, envelope("c-meta", "system.shutdown", {}), "user_id=43&team=a%20b&token=x")
        assert second.status_code == 200, second.text
        assert (await post(client, envelope("c-meta", "system.replica_joined", {}))).status_code == 200
        record = (await client.get("/conversations/c-meta")).json()
        page = (await client.get("/conversations")).json()
    expected = {"user_id": "43", "plan": "pro", "team": "a b"}  # never the token
    assert record["metadata"] == expected
    assert page["conversations"][0]["metadata"] == expected
    # SQLite may keep it as JSONB (json() gives its text); PostgreSQL keeps the text.
    sql = (
        "SELECT metadata FROM conversations" if is_postgres_url(target) else "SELECT json(metadata) FROM conversations"
    )
    assert rows(target, sql)[0][0].count('"') == 12


async def test_a_conversation_without_metadata_shows_an_empty_object(app_client: AppClient) -> None:
    async with app_client() as client:
        await post(client, transcription_ready("c-plain", turns=1))
        assert (await client.get("/conversations/c-plain")).json()["metadata"] == {}
        assert (await client.get("/conversations")).json()["conversations"][0]["metadata"] == {}


async def test_generic_intake_keeps_metadata_too(app_client: AppClient) -> None:
    async with app_client() as client:
        answer = await client.post("/conversations/c-app/messages?user_id=7", json={"role": "user", "content": "hi"})
        assert answer.status_code == 200, answer.text
        assert (await client.get("/conversations/c-app")).json()["metadata"] == {"user_id": "7"}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("user_id=1&bad%20key=2", "query.bad key"),
        (f"user_id=1&long={'v' * (MAX_VALUE_LENGTH + 1)}", "query.long"),
        ("user_id=1&" + "k" * 65 + "=1", "query." + "k" * 64),
        ("&".join(f"k{n}=v" for n in range(MAX_KEYS)) + "&user_id=1&one_more=1", "query.user_id"),
    ],
)
async def test_a_refused_parameter_is_a_422_naming_it_and_the_rest_is_stored(
    app_client: AppClient, query: str, field: str
) -> None:
    async with app_client() as client:
        answer = await post(client, transcription_ready("c-bounds", turns=2), query)
        assert answer.status_code == 422, answer.text
        error = answer.json()
        assert error["error"]["field"] == field
        assert error["accepted"]["status"] == "stored"
        assert error["accepted"]["inserted"] == 3
        record = (await client.get("/conversations/c-bounds")).json()
    if "k0" in query:
        assert len(record["metadata"]) == MAX_KEYS
    else:
        assert record["metadata"] == {"user_id": "1"}


async def test_merged_metadata_stays_within_the_key_limit(app_client: AppClient) -> None:
    async with app_client() as client:
        full = "&".join(f"k{n}=v" for n in range(MAX_KEYS))
        assert (await post(client, envelope("c-full", "system.replica_joined", {}), full)).status_code == 200
        more = await post(client, envelope("c-full", "system.shutdown", {}), "k0=changed&extra=1")
        assert more.status_code == 200, more.text
        record = (await client.get("/conversations/c-full")).json()
    assert len(record["metadata"]) == MAX_KEYS
    assert record["metadata"]["k0"] == "v"  # a delivery past the limit is not merged at all
    assert "extra" not in record["metadata"]


async def seed(client: httpx.AsyncClient) -> None:
    """Eight conversations: users 1 and 2, tavus and api, active and ended (c-0 and c-3)."""
    for n in range(8):
        cid, user = f"c-{n}", str(1 + n % 2)
        if n < 6:
            # A transcript comes after the call: it ends the conversation; a join leaves it active.
            body = transcription_ready(cid, turns=1) if n % 3 == 0 else envelope(cid, "system.replica_joined", {})
            assert (await post(client, body, f"user_id={user}")).status_code == 200
        else:
            url = f"/conversations/{cid}/messages?user_id={user}"
            assert (await client.post(url, json={"role": "user", "content": "hi"})).status_code == 200


async def test_filters_combine_and_carry_across_pages(app_client: AppClient, target: str) -> None:
    async with app_client() as client:
        await seed(client)
        everything, _ = await listed(client, "/conversations?limit=3")
        assert sorted(everything) == [f"c-{n}" for n in range(8)]
        users_1, links = await listed(client, "/conversations?limit=1&metadata.user_id=1")
        assert sorted(users_1) == ["c-0", "c-2", "c-4", "c-6"]
        assert all("metadata.user_id=1" in link for link in links if link)
        ended, _ = await listed(client, "/conversations?limit=1&status=ended")
        assert sorted(ended) == ["c-0", "c-3"]
        api, _ = await listed(client, "/conversations?limit=1&source=api&metadata.user_id=2")
        assert api == ["c-7"]
        combined, links = await listed(client, "/conversations?limit=1&status=active&source=tavus&metadata.user_id=2")
        assert sorted(combined) == ["c-1", "c-5"]
        assert links[0] is not None
        assert all(f"{name}=" in links[0] for name in ("status", "source", "metadata.user_id", "cursor"))
        nobody, _ = await listed(client, "/conversations?metadata.user_id=3")
        assert nobody == []

        (cutoff,) = rows(target, "SELECT updated_at FROM conversations WHERE id = 'c-5'")[0]
        newer = rows(target, "SELECT id FROM conversations WHERE updated_at >= ?", (cutoff,))
        expected = sorted(cid for (cid,) in newer)
        since, links = await listed(client, f"/conversations?limit=1&updated_since={cutoff!r}")
        assert sorted(since) == expected
        assert "c-5" in since
        assert all("updated_since=" in link for link in links if link)
        iso = "2000-01-01T00:00:00Z"
        assert sorted((await listed(client, f"/conversations?limit=5&updated_since={iso}"))[0]) == sorted(everything)
        future = await client.get("/conversations?updated_since=4102444800")  # 2100
        assert future.json()["conversations"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=closed", "query.status"),
        ("source=bogus", "query.source"),
        ("updated_since=yesterday", "query.updated_since"),
        ("updated_since=nan", "query.updated_since"),
        ("metadata.bad%20key=1", "query.metadata.bad key"),
        ("metadata.=1", "query.metadata."),
        ("&".join(f"metadata.k{n}=1" for n in range(9)), "query.metadata"),
        ("colour=red", "query"),
    ],
)
async def test_a_bad_filter_is_a_422_naming_the_parameter(app_client: AppClient, query: str, field: str) -> None:
    async with app_client() as client:
        answer = await client.get(f"/conversations?{query}")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field
