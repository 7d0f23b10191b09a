"""The read API's edges: query integers past int64, ids that need percent-encoding (or are not UTF-8), the role
filter, the two message counts, the duplicate flag, Retry-After on storage faults, and replay of an unknown id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.app import create_app
from daemon.ids import quoted
from tests.conftest import AppClient, Storage, locked
from tests.daemon_process import managed, start_daemon, transcriptd
from tests.payloads import encode, envelope, transcription_ready
from tests.test_fuzz import fresh_id, fuzz, running

pytestmark = pytest.mark.anyio

INT64_PAST = str(2**63)


@pytest.mark.parametrize(
    ("url", "field"),
    [
        (f"/conversations/c-big/messages?after={INT64_PAST}", "query.after"),
        ("/conversations/c-big/messages?after=99999999999999999999999999", "query.after"),
        (f"/conversations/c-big/messages?page={10**18}", "query.page"),
        # Fits int64 alone, but not once multiplied by the limit into an OFFSET.
        (f"/conversations/c-big/messages?page={2**62}&limit=500", "query.page"),
        (f"/conversations/c-big/messages?limit={10**30}", "query.limit"),
        (f"/conversations?limit={10**30}", "query.limit"),
        (f"/conversations/c-big/events?limit={10**30}", "query.limit"),
    ],
)
async def test_huge_query_integers_are_a_422_naming_the_parameter(app_client: AppClient, url: str, field: str) -> None:
    async with app_client() as client:
        await client.post("/conversations/c-big/messages", json={"role": "user", "content": "x"})
        response = await client.get(url)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


async def test_the_largest_page_and_cursor_that_fit_answer_an_empty_page(app_client: AppClient) -> None:
    async with app_client() as client:
        await client.post("/conversations/c-edge/messages", json={"role": "user", "content": "x"})
        after = await client.get(f"/conversations/c-edge/messages?after={2**63 - 1}")
        page = await client.get(f"/conversations/c-edge/messages?page={(2**63 - 1) // 500}&limit=500")
    assert after.status_code == 200, after.text
    assert page.status_code == 200, page.text
    assert after.json()["messages"] == page.json()["messages"] == []


ODD_IDS = ["a/b", "a?b", "a#b", "100%", "%2F", "with space", "çà-日本-😀", "..", ".", "a/../b", "+plus", "x;y=z"]


async def read_all_messages(client: httpx.AsyncClient, first: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    url: str | None = first
    for _ in range(100):  # bounded: a link that loops must fail the test, not hang it
        if url is None:
            return seen
        response = await client.get(url)
        assert response.status_code == 200, (url, response.text)
        seen += response.json()["messages"]
        url = response.json()["next"]
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("cid", ODD_IDS)
async def test_every_id_reads_back_and_its_links_are_percent_encoded(app_client: AppClient, cid: str) -> None:
    path = f"/conversations/{quoted(cid)}"
    async with app_client() as client:
        posted = await client.post(f"{path}/messages", json=[{"role": "user", "content": str(i)} for i in range(5)])
        assert posted.status_code == 200, posted.text
        record = await client.get(path)
        messages = await read_all_messages(client, f"{path}/messages?limit=2")
        first = (await client.get(f"{path}/messages?limit=2")).json()
    assert record.status_code == 200, record.text
    assert record.json()["id"] == cid
    assert [m["content"] for m in messages] == ["0", "1", "2", "3", "4"]
    assert first["next"] == f"{path}/messages?limit=2&page=2"


@pytest.mark.parametrize("method", ["GET record", "GET messages", "GET events", "POST messages"])
async def test_an_id_that_is_not_utf8_is_a_400_and_not_merged_with_u_fffd(app_client: AppClient, method: str) -> None:
    verb, what = method.split()
    suffix = "" if what == "record" else f"/{what}"
    async with app_client() as client:
        # U+FFFD itself is a valid id: %FF must not be read as (or stored under) it.
        await client.post("/conversations/%EF%BF%BD/messages", json={"role": "user", "content": "replacement char"})
        response = await client.request(verb, f"/conversations/%FF{suffix}", json={"role": "user", "content": "x"})
        kept = await client.get("/conversations/%EF%BF%BD/messages")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malformed_id"
    assert response.json()["error"]["field"] == "path.conversation_id"
    assert [m["content"] for m in kept.json()["messages"]] == ["replacement char"]


async def test_a_tavus_id_with_a_slash_is_readable(app_client: AppClient) -> None:
    async with app_client() as client:
        stored = await client.post("/webhooks/tavus", content=encode(transcription_ready("org/call 1", turns=2)))
        record = await client.get("/conversations/org%2Fcall%201")
        events = await client.get("/conversations/org%2Fcall%201/events")
    assert stored.status_code == 200
    assert record.status_code == 200, record.text
    assert record.json()["id"] == "org/call 1"
    assert events.json()["conversation_id"] == "org/call 1"


async def test_an_id_ending_in_a_newline_is_that_id_not_the_list(app_client: AppClient) -> None:
    # A route pattern ending in "$" also matches before a final newline: "/conversations/%0A" was the list.
    async with app_client() as client:
        missing = await client.get("/conversations/%0A")
        stored = await client.post("/webhooks/tavus", content=encode(transcription_ready("call\n", turns=1)))
        record = await client.get("/conversations/call%0A")
    assert missing.status_code == 404, missing.text
    assert stored.status_code == 200
    assert record.json()["id"] == "call\n"


async def test_role_takes_the_normal_roles_and_those_stored_and_refuses_a_typo(app_client: AppClient) -> None:
    # Intake stores a sender's own role of 1 to 64 characters (Tavus and the generic endpoint alike: a new role
    # must not cost its messages): the filter takes the four normal roles and any role the conversation holds,
    # and names anything else (a typo would otherwise be an empty page).
    async with app_client() as client:
        stored = await client.post("/conversations/c-role/messages", json={"role": "narrator", "content": "once"})
        too_long = await client.post("/conversations/c-role/messages", json={"role": "r" * 65, "content": "x"})
        narrator = await client.get("/conversations/c-role/messages?role=narrator")
        unused = await client.get("/conversations/c-role/messages?role=bogus")
        normal = await client.get("/conversations/c-role/messages?role=assistant")
        empty = await client.get("/conversations/c-role/messages?role=")
        long_filter = await client.get(f"/conversations/c-role/messages?role={'r' * 65}")
    assert stored.status_code == 200
    assert too_long.status_code == 422
    assert [m["content"] for m in narrator.json()["messages"]] == ["once"]
    assert normal.status_code == 200
    assert normal.json()["messages"] == []
    for refused in (unused, empty, long_filter):
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == "query.role"


async def test_the_record_counts_messages_with_and_without_system_entries(app_client: AppClient) -> None:
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(transcription_ready("c-count", turns=6)))
        record = (await client.get("/conversations/c-count")).json()
        listed = (await client.get("/conversations/c-count/messages?limit=500")).json()["messages"]
    assert record["message_count"] == 7  # the persona's system prompt is stored too
    assert record["message_count_without_system"] == 6 == len(listed)


@pytest.mark.parametrize(
    "body",
    [
        envelope("c-dup-shutdown", "system.shutdown", {"shutdown_reason": "end_call"}),
        transcription_ready("c-dup-transcript", turns=3),
    ],
    ids=["no messages", "transcript"],
)
async def test_a_repeated_delivery_says_it_is_a_duplicate(app_client: AppClient, body: dict[str, Any]) -> None:
    async with app_client() as client:
        first = await client.post("/webhooks/tavus", content=encode(body))
        again = await client.post("/webhooks/tavus", content=encode(body))
    assert first.json()["status"] == again.json()["status"] == "stored"
    assert first.json()["duplicate"] is False
    assert again.json()["duplicate"] is True
    assert again.json()["inserted"] == again.json()["updated"] == 0


async def test_a_storage_fault_answers_retry_after_from_the_setting(app_client: AppClient, target: str) -> None:
    settings = {"storage.busy_timeout_ms": 20, "ingest.retry_after_s": 7}
    async with app_client(**settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        with locked(target):
            refused = await client.post("/conversations/c-503/messages", json={"role": "user", "content": "x"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert refused.headers["retry-after"] == "7"


async def test_replay_of_an_unknown_conversation_exits_1_and_says_so(
    app_client: AppClient, target: str, tmp_path: Path
) -> None:
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(transcription_ready("c-known", turns=2)))
    cwd = tmp_path
    unknown = transcriptd("replay", "--db", target, "--conversation", "c-unknown", cwd=cwd)
    known = transcriptd("replay", "--db", target, "--conversation", "c-known", cwd=cwd)
    assert unknown.returncode == 1, unknown.stdout + unknown.stderr
    assert "c-unknown" in unknown.stderr
    assert unknown.stdout == ""
    assert known.returncode == 0, known.stderr
    assert "replayed 1 events" in known.stdout


def test_ids_in_the_openapi_description_are_strings_in_the_path() -> None:
    from daemon.openapi import build_spec

    spec = build_spec()
    events = spec["paths"]["/conversations/{conversation_id}/events"]["get"]
    assert {p["name"] for p in events["parameters"]} == {"conversation_id", "limit", "cursor", "include_body"}
    assert "400" in events["responses"]
    stored = spec["components"]["schemas"]["Stored"]["properties"]
    assert stored["duplicate"]["type"] == "boolean"
    record = spec["components"]["schemas"]["Conversation"]["properties"]
    assert "message_count_without_system" in record
    json.dumps(spec)  # serialisable as it is served


# --- Property: every id intake accepts reads back ----------------------------------------------------------

ID_ALPHABET = st.one_of(
    st.sampled_from("/?#% .+&=;:@\\\"'<>[]{}|^`~"),
    st.characters(exclude_categories=["Cs"]),  # any code point a UTF-8 path can carry (no lone surrogates)
)
ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=40) | st.sampled_from([".", "..", "%FF", "%2F", "/", "?"])


def test_any_id_intake_accepts_reads_back_through_every_read(storage: Storage) -> None:
    with running(create_app(storage.config())) as client:

        @fuzz(80)
        @given(cid=ids, via_tavus=st.booleans())
        def round_trip(cid: str, via_tavus: bool) -> None:
            marker = fresh_id("marker")
            if via_tavus:
                body = transcription_ready(cid, turns=0)
                body["properties"]["transcript"].append({"role": "user", "content": marker})
                posted = client.post("/webhooks/tavus", content=encode(body))
            else:
                posted = client.post(f"/conversations/{quoted(cid)}/messages", json={"role": "user", "content": marker})
            if storage.postgres and "\x00" in cid:
                # PostgreSQL's text cannot hold U+0000: refused, kept as a dead letter (docs/postgresql.md).
                assert posted.status_code >= 500, (cid, posted.text)
                assert posted.json()["error"]["code"] == "storage_rejected", posted.text
                return
            assert posted.status_code == 200, (cid, posted.text)
            path = f"/conversations/{quoted(cid)}"
            record = client.get(path)
            assert record.status_code == 200, (cid, record.text)
            assert record.json()["id"] == cid
            contents: list[str] = []
            url: str | None = f"{path}/messages?limit=1&source={'tavus' if via_tavus else 'api'}"
            for _ in range(200):  # bounded by count: the same id may have been drawn before
                if url is None:
                    break
                page = client.get(url)
                assert page.status_code == 200, (cid, url, page.text)
                contents += [m["content"] for m in page.json()["messages"]]
                url = page.json()["next"]
            assert marker in contents
            timeline = client.get(f"{path}/events")
            assert timeline.status_code == 200, (cid, timeline.text)
            assert timeline.json()["conversation_id"] == cid

        round_trip()


@pytest.mark.slow
def test_a_real_server_routes_ids_on_the_raw_path_and_logs_each_delivery(tmp_path: Path) -> None:
    # uvicorn fills raw_path from the request line itself: the in-process transport above only imitates it.
    cid = "org/call?1#x 100%"
    with managed(start_daemon(tmp_path, tmp_path / "transcriptd.db")) as daemon:
        with httpx.Client(base_url=daemon.base_url, timeout=10) as client:
            messages = [{"role": "user", "content": str(i)} for i in range(3)]
            posted = client.post(f"/conversations/{quoted(cid)}/messages", json=messages)
            record = client.get(f"/conversations/{quoted(cid)}")
            first = client.get(f"/conversations/{quoted(cid)}/messages?limit=2").json()
            second = client.get(first["next"]).json()
            not_utf8 = client.get("/conversations/%FF/messages")
        assert daemon.stop() == 0
        log = daemon.log()
    assert posted.status_code == 200, posted.text
    assert record.json()["id"] == cid
    assert [m["content"] for m in first["messages"] + second["messages"]] == ["0", "1", "2"]
    assert not_utf8.status_code == 400
    assert f"delivery stored: conversation={cid!r} source=api" in log
