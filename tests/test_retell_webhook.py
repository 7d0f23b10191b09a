"""POST /webhooks/retell end to end: signed the vendor's way, through the real app, SQLite and the read API."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.logs import RedactSecrets, config_secrets
from daemon.sources.retell import SIGNATURE_HEADER
from tests.conftest import AppClient, execute, make_config
from tests.daemon_process import managed, start_daemon, transcriptd
from tests.retell_signing import sign
from tests.test_operations import table

pytestmark = pytest.mark.anyio

Query = Any
API_KEY = "key_retell-e2e-5a7c"  # in TEST_SECRETS
SIGNED = {"webhooks.retell.api_key": API_KEY}
FIXTURES = Path(__file__).parent / "fixtures" / "retell"
CALL_ID = "Jabr9TXYYJHfvl6Syypi88rdAHYHmcq6"
TABLES = ("conversations", "messages")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def encode(event: str, call: dict[str, Any]) -> bytes:
    return json.dumps({"event": event, "call": call}).encode()


async def post(client: httpx.AsyncClient, body: bytes, *, key: str = API_KEY, path: str = "/webhooks/retell") -> Any:
    return await client.post(path, content=body, headers={SIGNATURE_HEADER: sign(body, key)})


async def messages(client: httpx.AsyncClient, cid: str) -> list[dict[str, Any]]:
    response = await client.get(f"/conversations/{cid}/messages", params={"limit": 500, "include_system": "true"})
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def test_the_docs_call_ended_is_stored_turn_by_turn(app_client: AppClient, db: Query) -> None:
    body = (FIXTURES / "call_ended.json").read_bytes()
    async with app_client(**SIGNED) as client:
        response = await post(client, body)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "stored",
            "received": 4,
            "inserted": 4,
            "updated": 0,
            "duplicates": 0,
            "rejected": 0,
            "duplicate": False,
        }
        read = await messages(client, CALL_ID)
        conversation = (await client.get(f"/conversations/{CALL_ID}")).json()
    sent = fixture("call_ended.json")["call"]["transcript_with_tool_calls"]
    assert [(m["seq"], m["content"]) for m in read] == [(i, e["content"]) for i, e in enumerate(sent)]
    assert [(m["role"], m.get("vendor_role")) for m in read] == [
        ("assistant", "agent"),
        ("user", None),
        ("assistant", "agent"),
        ("user", None),
    ]
    assert {m["source"] for m in read} == {"retell"}
    assert (read[0]["seconds_from_start"], read[0]["duration"]) == (0.5, 2.8)
    assert "timestamp" not in read[0]
    assert conversation["source"] == "retell"
    assert (conversation["status"], conversation["end_reason"]) == ("ended", "user_hangup")
    assert (conversation["started_at"], conversation["ended_at"]) == (1714608475.945, 1714608491.736)
    assert conversation["message_count"] == 4
    # The exact bytes, as the audit log to replay from.
    assert db("SELECT event_type, body FROM events") == [("call_ended", body)]


async def test_redeliveries_add_nothing(app_client: AppClient, db: Query) -> None:
    call = fixture("call_ended.json")["call"]
    body = encode("call_ended", call)
    retried = copy.deepcopy(call)
    retried["recording_url"] = "https://example.test/recording.wav?X-Amz-Signature=another"  # signed anew
    async with app_client(**SIGNED) as client:
        assert (await post(client, body)).status_code == 200
        again = await post(client, body)  # signed again: a new timestamp, the same delivery
        retry = await post(client, encode("call_ended", retried))
    for answer in (again, retry):
        assert answer.status_code == 200
        assert answer.json()["inserted"] == answer.json()["updated"] == 0
    assert db("SELECT count(*) FROM events") == [(1,)]
    assert db("SELECT count(*) FROM messages") == [(4,)]


async def test_call_analyzed_after_call_ended_updates_instead_of_duplicating(app_client: AppClient, db: Query) -> None:
    ended = fixture("call_ended.json")["call"]
    analyzed = {**ended, "call_status": "ended", "call_analysis": fixture("api_reference_call.json")["call_analysis"]}
    # The agent's last turn was still being transcribed when call_ended went out.
    analyzed["transcript_with_tool_calls"] = copy.deepcopy(ended["transcript_with_tool_calls"])
    analyzed["transcript_with_tool_calls"][3]["content"] = "Yes, it's 78542. Thanks!"
    async with app_client(**SIGNED) as client:
        assert (await post(client, encode("call_ended", ended))).status_code == 200
        response = await post(client, encode("call_analyzed", analyzed))
        read = await messages(client, CALL_ID)
        conversation = (await client.get(f"/conversations/{CALL_ID}")).json()
    assert response.status_code == 200, response.text
    assert (response.json()["inserted"], response.json()["updated"], response.json()["duplicates"]) == (0, 1, 3)
    assert len(read) == 4
    assert read[3]["content"] == "Yes, it's 78542. Thanks!"
    assert conversation["analysis"] == analyzed["call_analysis"]
    assert conversation["analysis"]["call_successful"] is True
    assert conversation["message_count"] == 4
    assert db("SELECT event_type FROM events ORDER BY id") == [("call_ended",), ("call_analyzed",)]


async def test_tool_calls_are_tool_messages_in_transcript_order(app_client: AppClient) -> None:
    docs = fixture("custom_function_request.json")["call"]
    entries = [
        *docs["transcript_with_tool_calls"],
        # A result, in the SDK's TranscriptWithToolCallToolCallResultUtterance shape.
        {"role": "tool_call_result", "tool_call_id": "tool_call_abc123", "content": "positive", "successful": True},
        {"role": "agent", "content": "Your order shipped yesterday.", "words": []},
    ]
    call = {**docs, "call_id": "c-tools", "transcript_with_tool_calls": entries}
    async with app_client(**SIGNED) as client:
        assert (await post(client, encode("call_ended", call))).status_code == 200
        read = await messages(client, "c-tools")
    assert [(m["role"], m.get("vendor_role")) for m in read] == [
        ("user", None),
        ("tool", "tool_call_invocation"),
        ("tool", "tool_call_result"),
        ("assistant", "agent"),
    ]
    assert json.loads(read[1]["content"]) == {
        "tool_call_id": "tool_call_abc123",
        "name": "analyze_transcript",
        "arguments": '{"analysis_type": "sentiment"}',
    }
    assert json.loads(read[2]["content"]) == {
        "tool_call_id": "tool_call_abc123",
        "content": "positive",
        "successful": True,
    }


async def test_transcript_updated_snapshots_then_the_end(app_client: AppClient, db: Query) -> None:
    turns = fixture("call_ended.json")["call"]["transcript_object"]
    async with app_client(**SIGNED) as client:
        for upto in (1, 2, 2, 3):  # the same snapshot twice is one delivery
            snapshot = {"call_id": "c-live", "call_status": "ongoing", "transcript_with_tool_calls": turns[:upto]}
            assert (await post(client, encode("transcript_updated", snapshot))).status_code == 200
        live = (await client.get("/conversations/c-live")).json()
        final = {"call_id": "c-live", "call_status": "ended", "transcript_with_tool_calls": turns}
        assert (await post(client, encode("call_ended", final))).status_code == 200
        # The call's last snapshot may come after call_ended: it must not make the call active again.
        assert (await post(client, encode("transcript_updated", final))).status_code == 200
        read = await messages(client, "c-live")
        ended = (await client.get("/conversations/c-live")).json()
    assert live["status"] == "active"
    assert [m["content"] for m in read] == [t["content"] for t in turns]
    assert ended["status"] == "ended"
    assert db("SELECT count(*) FROM events WHERE conversation_id = 'c-live'") == [(5,)]


async def test_a_call_that_never_connected_is_failed_with_its_reason(app_client: AppClient) -> None:
    call = {"call_id": "c-busy", "call_status": "not_connected", "disconnection_reason": "dial_busy"}
    async with app_client(**SIGNED) as client:
        assert (await post(client, encode("call_ended", call))).status_code == 200
        assert (await post(client, encode("call_analyzed", {**call, "call_analysis": {}}))).status_code == 200
        conversation = (await client.get("/conversations/c-busy")).json()
    assert (conversation["status"], conversation["end_reason"], conversation["message_count"]) == (
        "failed",
        "dial_busy",
        0,
    )


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("transfer_started", {"call": {"call_id": "c-other", "transfer_destination": "+15550100"}}),
        ("chat_started", {"chat": {"chat_id": "chat-other"}}),
        ("something_new", {"call": {"call_id": "c-new"}}),
    ],
)
async def test_other_event_types_are_stored_raw_and_answered_2xx(
    app_client: AppClient, db: Query, event: str, payload: dict[str, Any]
) -> None:
    body = json.dumps({"event": event, **payload}).encode()
    async with app_client(**SIGNED) as client:
        response = await post(client, body)
    assert response.status_code == 200, response.text
    assert db("SELECT event_type, body FROM events") == [(event, body)]
    assert db("SELECT count(*) FROM messages") == [(0,)]


def _signed_at(body: bytes, offset_ms: int) -> str:
    return sign(body, API_KEY, round(time.time() * 1000) + offset_ms)


@pytest.mark.parametrize(
    ("signature", "named"),
    [
        (None, "missing X-Retell-Signature header"),
        ("", "missing X-Retell-Signature header"),
        ("v=1,d=abc", "malformed X-Retell-Signature header"),
        ("wrong key", "does not match"),
        ("other body", "does not match"),
        ("stale", "too old"),
        ("future", "in the future"),
    ],
)
async def test_missing_wrong_and_stale_signatures_are_401_and_store_nothing(
    app_client: AppClient, db: Query, signature: str | None, named: str
) -> None:
    body = (FIXTURES / "call_ended.json").read_bytes()
    headers: dict[str, str] = {}
    if signature == "wrong key":
        headers[SIGNATURE_HEADER] = sign(body, "key_someone-else")
    elif signature == "other body":
        headers[SIGNATURE_HEADER] = sign(body.replace(b"John Doe", b"Jane Doe"), API_KEY)
    elif signature == "stale":
        headers[SIGNATURE_HEADER] = _signed_at(body, -301_000)
    elif signature == "future":
        headers[SIGNATURE_HEADER] = _signed_at(body, 301_000)
    elif signature is not None:
        headers[SIGNATURE_HEADER] = signature
    async with app_client(**SIGNED) as client:
        response = await client.post("/webhooks/retell", content=body, headers=headers)
    assert response.status_code == 401
    assert named in response.json()["error"]["message"]
    assert API_KEY not in response.text
    assert db("SELECT count(*) FROM events") == [(0,)]


async def test_the_tolerance_is_a_setting(app_client: AppClient) -> None:
    body = encode("call_started", {"call_id": "c-tol"})
    async with app_client(**SIGNED, **{"webhooks.retell.signature_tolerance_s": 30}) as client:
        late = await client.post(
            "/webhooks/retell", content=body, headers={SIGNATURE_HEADER: _signed_at(body, -31_000)}
        )
        ok = await client.post("/webhooks/retell", content=body, headers={SIGNATURE_HEADER: _signed_at(body, -29_000)})
    assert (late.status_code, ok.status_code) == (401, 200)


async def test_without_an_api_key_every_delivery_is_a_503(app_client: AppClient, db: Query) -> None:
    body = encode("call_ended", {"call_id": "c-nokey"})
    async with app_client() as client:
        response = await post(client, body)
    # Our configuration is missing, not the sender's signature: never a 4xx.
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"
    assert "webhooks.retell.api_key is not set" in response.json()["error"]["message"]
    assert db("SELECT count(*) FROM events") == [(0,)]


async def test_the_path_token_and_the_signature_are_both_checked(app_client: AppClient, db: Query) -> None:
    token = "t0ken-Secret-1234"  # in TEST_SECRETS
    body = encode("call_started", {"call_id": "c-token"})
    async with app_client(**SIGNED, **{"webhooks.retell.token": token}) as client:
        bare = await post(client, body)
        unsigned = await client.post(f"/webhooks/retell/{token}", content=body)
        both = await post(client, body, path=f"/webhooks/retell/{token}")
    assert (bare.status_code, unsigned.status_code, both.status_code) == (401, 401, 200)
    assert "token" in bare.json()["error"]["message"]
    assert "X-Retell-Signature" in unsigned.json()["error"]["message"]
    assert db("SELECT count(*) FROM events") == [(1,)]


async def test_a_bad_entry_is_named_and_the_rest_stored(app_client: AppClient, db: Query) -> None:
    call = {
        "call_id": "c-bad",
        "transcript_object": [{"role": "agent", "content": "kept"}, {"content": 5}, {"role": "user", "content": "too"}],
    }
    async with app_client(**SIGNED) as client:
        response = await post(client, encode("call_ended", call))
        # Retell retries anything but a 2xx: the retry is the same delivery, answered the same way.
        retry = await post(client, encode("call_ended", call))
        read = await messages(client, "c-bad")
    assert response.status_code == retry.status_code == 422
    assert (retry.json()["accepted"]["inserted"], retry.json()["accepted"]["duplicates"]) == (0, 2)
    assert db("SELECT count(*) FROM events") == [(1,)]
    error = response.json()
    assert error["error"]["field"] == "$.call.transcript_object[1].content"
    assert (error["accepted"]["inserted"], error["accepted"]["rejected"]) == (2, 1)
    assert [(m["seq"], m["content"]) for m in read] == [(0, "kept"), (2, "too")]


async def test_transcriptd_replay_rebuilds_retell_calls_exactly(
    app_client: AppClient, target: str, tmp_path: Path
) -> None:
    ended = fixture("call_ended.json")["call"]
    analyzed = {**ended, "call_analysis": fixture("api_reference_call.json")["call_analysis"]}
    async with app_client(**SIGNED) as client:
        for event, call in (("call_ended", ended), ("call_analyzed", analyzed)):
            assert (await post(client, encode(event, call))).status_code == 200
    original = {name: table(target, name, ignore=("id", "created_at", "updated_at")) for name in TABLES}
    execute(target, "DELETE FROM messages; DELETE FROM conversations")
    # The real command, in its own process, from the raw events alone: no headers, no signature.
    done = transcriptd("replay", "--db", target, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replayed 2 events" in done.stdout, done.stdout
    for name in TABLES:
        assert table(target, name, ignore=("id", "created_at", "updated_at")) == original[name], name
    assert len(original["messages"]) == 4


async def test_a_body_that_is_not_utf8_is_a_400_after_its_signature(app_client: AppClient, db: Query) -> None:
    # Retell's SDK signs text only, so this one is signed by hand, the documented way: hex HMAC-SHA256 of
    # the body's bytes followed by the timestamp's digits.
    body = b'{"event": "call_ended", "call": {"call_id": "c-\xff"}}'
    stamp = str(round(time.time() * 1000)).encode()
    digest = hmac.new(API_KEY.encode(), body + stamp, hashlib.sha256).hexdigest()
    async with app_client(**SIGNED) as client:
        response = await client.post(
            "/webhooks/retell", content=body, headers={SIGNATURE_HEADER: f"v={stamp.decode()},d={digest}"}
        )
    assert response.status_code == 400, response.text
    assert db("SELECT count(*) FROM events") == [(0,)]


def test_each_configured_retell_key_is_masked_in_logs(db_path: Path) -> None:
    rotated = "key_retell-rotated-9d2e"  # in TEST_SECRETS
    config = make_config(db_path, **{"webhooks.retell.api_key": f"{rotated} {API_KEY}"})
    mask = RedactSecrets(config_secrets(config))
    line = mask.redact(f"verifying with {API_KEY} (was {rotated})")
    assert API_KEY not in line
    assert rotated not in line


def test_a_real_server_takes_the_key_from_its_environment_and_a_signed_call(tmp_path: Path) -> None:
    # Real HTTP over loopback to `transcriptd serve`: the header as uvicorn hands it over, the key from
    # TRANSCRIPTD_WEBHOOKS_RETELL_API_KEY (the session's log check then reads this daemon's log for it).
    db_path = tmp_path / "transcriptd.db"
    body = (FIXTURES / "call_ended.json").read_bytes()
    env = {"TRANSCRIPTD_WEBHOOKS_RETELL_API_KEY": API_KEY}
    with managed(start_daemon(tmp_path, db_path, env=env)) as daemon, httpx.Client(trust_env=False) as http:
        url = f"{daemon.base_url}/webhooks/retell"
        unsigned = http.post(url, content=body)
        signed = http.post(url, content=body, headers={"X-Retell-Signature": sign(body, API_KEY)})
        read = http.get(f"{daemon.base_url}/conversations/{CALL_ID}/messages").json()["messages"]
        assert daemon.stop(signal.SIGTERM) == 0
    assert (unsigned.status_code, signed.status_code) == (401, 200), signed.text
    assert [m["content"] for m in read] == [
        t["content"] for t in fixture("call_ended.json")["call"]["transcript_with_tool_calls"]
    ]
