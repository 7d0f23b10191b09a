"""Vapi end to end, through the real app: a signed end-of-call report stored turn by turn and read back
normalised; re-deliveries and snapshots that add nothing; 401s for missing, wrong and stale signatures;
other types answered 2xx; and, property-based, any transcript reads back exactly."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.app import create_app
from daemon.sources.vapi import ROLES
from tests.conftest import AppClient, Storage
from tests.daemon_process import managed, start_daemon
from tests.test_fuzz import (
    Client,
    broken_json,
    check_answer,
    check_answer_to,
    fresh_id,
    fuzz,
    json_values,
    running,
    text_content,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vapi"
SECRET = "vapi-intake-hmac-secret"
SIGNED = {"webhooks.vapi.hmac_secret": SECRET}


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_bytes())
    return loaded


def signed(body: bytes, *, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    """Vapi's default HMAC: hex HMAC-SHA256 of "{timestamp}.{body}", the timestamp in its own header."""
    stamp = str(int(time.time() if at is None else at))
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"x-signature": mac, "x-timestamp": stamp, "content-type": "application/json"}


async def post(client: httpx.AsyncClient, payload: dict[str, Any], **kwargs: Any) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await client.post("/webhooks/vapi", content=body, headers=signed(body, **kwargs))


async def messages(client: httpx.AsyncClient, cid: str) -> list[dict[str, Any]]:
    page = await client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
    assert page.status_code == 200, page.text
    found: list[dict[str, Any]] = page.json()["messages"]
    return found


pytestmark = pytest.mark.anyio


async def test_a_signed_end_of_call_report_is_stored_turn_by_turn(app_client: AppClient) -> None:
    report = fixture("schema-end-of-call-report-with-tools.json")
    cid = report["message"]["call"]["id"]
    sent = report["message"]["artifact"]["messages"]
    async with app_client(**SIGNED) as client:
        answer = await post(client, report)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "status": "stored",
            "received": 6,
            "inserted": 6,
            "updated": 0,
            "duplicates": 0,
            "rejected": 0,
            "duplicate": False,
        }
        stored = await messages(client, cid)
        record = (await client.get(f"/conversations/{cid}")).json()
        by_source = await client.get(f"/conversations/{cid}/messages", params={"source": "vapi"})
    assert [m["seq"] for m in stored] == list(range(6))
    assert [m["role"] for m in stored] == ["system", "assistant", "user", "tool", "tool", "assistant"]
    assert [m.get("vendor_role") for m in stored] == [None, "bot", None, "tool_calls", "tool_call_result", "bot"]
    for got, entry in zip(stored, sent, strict=True):
        if entry["role"] in ("system", "bot", "user"):
            assert got["content"] == entry["message"]
        assert got["timestamp"] == pytest.approx(entry["time"] / 1000)
        assert got["seconds_from_start"] == entry["secondsFromStart"]
        assert got.get("duration") == entry.get("duration")
    assert json.loads(stored[3]["content"]) == sent[3]["toolCalls"]
    assert json.loads(stored[4]["content"])["result"] == sent[4]["result"]
    assert (record["source"], record["status"], record["end_reason"]) == ("vapi", "ended", "customer-ended-call")
    assert record["analysis"] == report["message"]["analysis"]
    assert record["recording"]["uri"] == report["message"]["artifact"]["recordingUrl"]
    assert record["message_count"] == 6
    assert by_source.status_code == 200


async def test_re_deliveries_and_snapshots_add_nothing(app_client: AppClient) -> None:
    report = fixture("schema-end-of-call-report-with-tools.json")
    cid = report["message"]["call"]["id"]
    entries = report["message"]["artifact"]["messages"]
    async with app_client(**SIGNED) as client:
        # The conversation as it grew: two snapshots, the second one fuller, and a re-sent one.
        for count, stamp in ((2, 1000), (4, 2000), (4, 2000)):
            snapshot = {
                "message": {
                    "type": "conversation-update",
                    "timestamp": stamp,
                    "call": {"id": cid},
                    "messages": entries[:count],
                }
            }
            assert (await post(client, snapshot)).status_code == 200
        assert len(await messages(client, cid)) == 4
        first = await post(client, report)
        assert first.json()["inserted"] == 2  # only the two turns no snapshot had
        # Re-sent, with its presigned URL changed as Vapi's are on every delivery: nothing stored twice.
        report["message"]["artifact"]["presignedMonoUrl"] += "&X-Amz-Date=later"
        again = await post(client, report)
        assert again.status_code == 200
        assert (again.json()["inserted"], again.json()["duplicates"]) == (0, 6)
        stored = await messages(client, cid)
        record = (await client.get(f"/conversations/{cid}")).json()
    assert [m["seq"] for m in stored] == list(range(6))
    assert record["message_count"] == 6


async def test_a_later_snapshot_rewrites_a_changed_turn(app_client: AppClient) -> None:
    cid = fresh_id("vapi-snapshot")
    early = {"role": "user", "message": "What's the wea", "time": 1744364970994, "secondsFromStart": 3.37}
    final = {**early, "message": "What's the weather?"}
    async with app_client(**SIGNED) as client:
        for stamp, entry in ((1, early), (2, final)):
            snapshot = {"message": {"type": "conversation-update", "timestamp": stamp, "call": {"id": cid}}}
            snapshot["message"]["messages"] = [entry]
            assert (await post(client, snapshot)).status_code == 200
        stored = await messages(client, cid)
    assert [m["content"] for m in stored] == ["What's the weather?"]


@pytest.mark.parametrize(
    ("headers", "check"),
    [
        ({}, "missing x-signature"),
        ({"x-signature": "00" * 32, "x-timestamp": "NOW"}, "does not match"),
        ("wrong secret", "does not match"),
        ("stale", "too old"),
        ("future", "in the future"),
        ("another body", "does not match"),
    ],
)
async def test_missing_wrong_and_stale_signatures_are_401(
    app_client: AppClient, headers: dict[str, str] | str, check: str
) -> None:
    report = fixture("events-end-of-call-report.json")
    body = json.dumps(report).encode()
    async with app_client(**SIGNED) as client:
        # Signed once the app is up: a slow start-up must not bring a signature 301 s ahead within 300 s.
        now = time.time()
        sent = {
            "wrong secret": lambda: signed(body, secret="another-secret"),
            "stale": lambda: signed(body, at=now - 301),
            "future": lambda: signed(body, at=now + 301),
            "another body": lambda: signed(body + b" "),
        }
        if isinstance(headers, str):
            headers = sent[headers]()
        headers = {k: v.replace("NOW", str(int(now))) for k, v in headers.items()}
        answer = await client.post("/webhooks/vapi", content=body, headers=headers)
        missing = await client.get(f"/conversations/{report['message']['call']['id']}")
    assert answer.status_code == 401
    assert check in answer.json()["error"]["message"]
    assert missing.status_code == 404  # nothing stored


async def test_other_types_are_stored_raw_and_answered_2xx(app_client: AppClient, db: Any) -> None:
    async with app_client(**SIGNED) as client:
        for name in ("events-hang.json", "events-status-update.json"):
            answer = await post(client, fixture(name))
            assert answer.status_code == 200, answer.text
            assert answer.json()["received"] == 0
        speech = {"message": {"type": "speech-update", "status": "started", "role": "assistant", "call": {"id": "s"}}}
        assert (await post(client, speech)).status_code == 200
        ended = (await client.get("/conversations/docs-events-status-update")).json()
        metrics = (await client.get("/metrics")).text
    assert ended["status"] == "ended"
    assert {row[0] for row in db("SELECT event_type FROM events WHERE source = 'vapi'")} == {
        "hang",
        "status-update",
        "speech-update",
    }
    assert 'transcriptd_deliveries_total{event_type="status-update",outcome="stored"} 1.0' in metrics
    assert 'transcriptd_deliveries_total{event_type="other",outcome="stored"} 2.0' in metrics


async def test_the_shared_secret_and_the_path_token(app_client: AppClient) -> None:
    body = json.dumps(fixture("events-end-of-call-report.json")).encode()
    settings = {"webhooks.vapi.secret": "vapi-shared-s3cret", "webhooks.vapi.token": "vapi-path-t0ken"}
    async with app_client(**settings) as client:
        ok = await client.post(
            "/webhooks/vapi/vapi-path-t0ken", content=body, headers={"x-vapi-secret": "vapi-shared-s3cret"}
        )
        bearer = await client.post(
            "/webhooks/vapi/vapi-path-t0ken", content=body, headers={"authorization": "Bearer vapi-shared-s3cret"}
        )
        no_secret = await client.post("/webhooks/vapi/vapi-path-t0ken", content=body)
        no_token = await client.post("/webhooks/vapi", content=body, headers={"x-vapi-secret": "vapi-shared-s3cret"})
    assert (ok.status_code, bearer.status_code) == (200, 200)
    assert bearer.json()["duplicates"] == 2  # the same report again
    assert no_secret.status_code == no_token.status_code == 401
    assert "Vapi secret" in no_secret.json()["error"]["message"]


async def test_a_bad_entry_is_a_422_and_the_rest_is_stored(app_client: AppClient) -> None:
    report = fixture("schema-end-of-call-report-with-tools.json")
    report["message"]["call"]["id"] = cid = fresh_id("vapi-bad")
    report["message"]["artifact"]["messages"][1]["role"] = "narrator"
    async with app_client(**SIGNED) as client:
        answer = await post(client, report)
        stored = await messages(client, cid)
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "$.message.artifact.messages[1].role"
    assert answer.json()["accepted"]["inserted"] == 5
    assert [m["seq"] for m in stored] == [0, 2, 3, 4, 5]


# --- Properties, through the app in one event loop thread (see tests/test_fuzz.py) ---------------------------


@pytest.fixture
def client(storage: Storage) -> Iterator[Client]:
    with running(create_app(storage.config())) as client:
        yield client


vapi_entries = st.fixed_dictionaries(
    {"role": st.sampled_from(sorted(set(ROLES) - {"tool_calls", "tool_call_result"})), "message": text_content},
    optional={
        "time": st.integers(0, 4_000_000_000_000),
        "secondsFromStart": st.floats(0, 1e6),
        "duration": st.floats(0, 1e7),
    },
)


def test_every_vapi_transcript_reads_back_exactly(client: Client, storage: Storage) -> None:
    @fuzz(80)
    @given(
        entries=st.lists(vapi_entries, max_size=10), kind=st.sampled_from(["end-of-call-report", "conversation-update"])
    )
    def round_trip(entries: list[dict[str, Any]], kind: str) -> None:
        cid = fresh_id("vapi")
        message: dict[str, Any] = {"type": kind, "call": {"id": cid}, "timestamp": 1}
        if kind == "end-of-call-report":
            message["artifact"] = {"messages": entries}
        else:
            message["messages"] = entries
        body = json.dumps({"message": message}).encode()
        answer = client.post("/webhooks/vapi", content=body)
        if storage.refused(answer, entries):
            return
        check_answer(answer)
        assert answer.status_code == 200, answer.text
        assert answer.json()["inserted"] == len(entries)
        read = client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
        assert read.status_code == 200, read.text
        stored = read.json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [(ROLES[e["role"]], e["message"]) for e in entries]
        assert [m.get("vendor_role") for m in stored] == [
            None if ROLES[e["role"]] == e["role"] else e["role"] for e in entries
        ]
        for got, entry in zip(stored, entries, strict=True):
            if "time" in entry:
                assert got["timestamp"] == pytest.approx(entry["time"] / 1000)
        assert client.post("/webhooks/vapi", content=body).json()["inserted"] == 0

    round_trip()


def test_broken_and_odd_vapi_bodies_never_fail_the_server(client: Client, storage: Storage) -> None:
    message = st.fixed_dictionaries(
        {"type": st.sampled_from(["end-of-call-report", "status-update", "conversation-update", "hang"]) | json_values},
        optional={
            "call": st.fixed_dictionaries({"id": st.text(max_size=300) | json_values}) | json_values,
            "artifact": st.fixed_dictionaries({"messages": st.lists(vapi_entries | json_values, max_size=4)})
            | json_values,
            "messages": st.lists(vapi_entries | json_values, max_size=4) | json_values,
            "analysis": json_values,
            "status": json_values,
            "startedAt": json_values,
            "timestamp": json_values,
        },
    )
    bodies = st.one_of(
        st.fixed_dictionaries({"message": message}).map(lambda b: json.dumps(b).encode()),
        json_values.map(lambda b: json.dumps(b).encode()),
        broken_json,
    )

    @fuzz(200)
    @given(body=bodies)
    def send(body: bytes) -> None:
        check_answer_to(client.post("/webhooks/vapi", content=body), storage, body)

    send()


# --- A real server -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_server_takes_the_vapi_secrets_from_its_environment(tmp_path: Path) -> None:
    """transcriptd serve, with the HMAC secret and path token only in its environment, over loopback."""
    token = "vapi-env-path-t0ken"
    env = {"TRANSCRIPTD_WEBHOOKS_VAPI_HMAC_SECRET": SECRET, "TRANSCRIPTD_WEBHOOKS_VAPI_TOKEN": token}
    report = fixture("schema-end-of-call-report-with-tools.json")
    body = json.dumps(report).encode()
    with managed(start_daemon(tmp_path, tmp_path / "transcriptd.db", env=env)) as daemon:
        with httpx.Client(base_url=daemon.base_url, timeout=15.0, trust_env=False) as http:
            unsigned = http.post(f"/webhooks/vapi/{token}", content=body)
            stored = http.post(f"/webhooks/vapi/{token}", content=body, headers=signed(body))
            read = http.get(f"/conversations/{report['message']['call']['id']}/messages", params={"limit": "500"})
        assert daemon.stop(signal.SIGTERM) == 0
        log = daemon.log()
    assert unsigned.status_code == 401
    assert stored.status_code == 200, stored.text
    assert stored.json()["inserted"] == 6
    assert [m["role"] for m in read.json()["messages"]] == ["assistant", "user", "tool", "tool", "assistant"]
    assert SECRET not in log
    assert token not in log
