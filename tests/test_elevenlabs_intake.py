"""POST /webhooks/elevenlabs end to end, through the app in-process: signed the SDK's way, stored, read back."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from elevenlabs.client import ElevenLabs
from hypothesis import given
from hypothesis import strategies as st

from daemon.app import create_app
from daemon.logs import RedactSecrets, config_secrets
from tests.conftest import TEST_SECRETS, AppClient, Storage, make_config
from tests.test_fuzz import Client, check_answer, fresh_id, fuzz, running, text_content

pytestmark = pytest.mark.anyio

Query = Any

SECRET = TEST_SECRETS[TEST_SECRETS.index("wsec_transcriptd-test-elevenlabs-1")]
OTHER = TEST_SECRETS[TEST_SECRETS.index("wsec_transcriptd-test-elevenlabs-2")]
SIGNED = {"webhooks.elevenlabs.signing_secret": SECRET}
FIXTURES = Path(__file__).parent / "fixtures" / "elevenlabs"
URL = "/webhooks/elevenlabs"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def signed(body: bytes, *, secret: str = SECRET, age_s: int = 0) -> dict[str, str]:
    """The header as ElevenLabs (and the SDK's tests) make it; checked against the installed SDK too."""
    timestamp = str(int(time.time()) - age_s)
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    header = f"t={timestamp},v0={digest}"
    if secret == SECRET and 0 <= age_s <= 1800:
        # What is sent here as valid, the SDK accepts: the tests do not sign in a way of their own.
        ElevenLabs(api_key="unused").webhooks.construct_event(body.decode(), header, SECRET)
    return {"ElevenLabs-Signature": header, "content-type": "application/json"}


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    assert SECRET not in message
    assert OTHER not in message
    return message


async def messages_of(client: httpx.AsyncClient, cid: str) -> list[dict[str, Any]]:
    response = await client.get(f"/conversations/{cid}/messages", params={"limit": "500", "include_system": "true"})
    assert response.status_code == 200, response.text
    page: list[dict[str, Any]] = response.json()["messages"]
    return page


async def test_a_signed_transcript_is_stored_in_order_and_read_back(app_client: AppClient, db: Query) -> None:
    body = fixture("post_call_transcription.json")
    async with app_client(**SIGNED) as client:
        response = await client.post(URL, content=body, headers=signed(body))
        assert response.status_code == 200, response.text  # exactly 200: ElevenLabs counts nothing else
        assert response.json() == {
            "status": "stored",
            "received": 3,
            "inserted": 3,
            "updated": 0,
            "duplicates": 0,
            "rejected": 0,
            "duplicate": False,
        }
        stored = await messages_of(client, "abc")
        record = (await client.get("/conversations/abc")).json()
    turns = json.loads(body)["data"]["transcript"]
    assert [(m["seq"], m["role"], m.get("vendor_role"), m["content"]) for m in stored] == [
        (0, "assistant", "agent", turns[0]["message"]),
        (1, "user", None, turns[1]["message"]),
        (2, "assistant", "agent", turns[2]["message"]),
    ]
    assert [m["source"] for m in stored] == ["elevenlabs"] * 3
    assert [(m["seconds_from_start"], m["timestamp"]) for m in stored] == [
        (0, 1739537297),
        (2, 1739537299),
        (9, 1739537306),
    ]
    assert (record["source"], record["status"], record["message_count"]) == ("elevenlabs", "ended", 3)
    assert (record["started_at"], record["ended_at"], record["end_reason"]) == (1739537297, 1739537319, None)
    assert record["analysis"] == json.loads(body)["data"]["analysis"]
    # The raw event is kept as received, under the vendor's key.
    assert db("SELECT delivery_key, event_type, body FROM events") == [
        ("elevenlabs:post_call_transcription:1739537297:abc", "post_call_transcription", body)
    ]


async def test_re_deliveries_add_nothing(app_client: AppClient, db: Query) -> None:
    body = fixture("post_call_transcription_tools.json")
    async with app_client(**SIGNED) as client:
        first = await client.post(URL, content=body, headers=signed(body))
        assert first.status_code == 200, first.text
        assert first.json()["inserted"] == 6
        # The same event again, signed again (a retry), and with other formatting: the same delivery.
        again = await client.post(URL, content=body, headers=signed(body, age_s=5))
        reformatted = json.dumps(json.loads(body)).encode()
        third = await client.post(URL, content=reformatted, headers=signed(reformatted))
        stored = await messages_of(client, "conv_tools")
    for response in (again, third):
        assert response.status_code == 200, response.text
        assert response.json()["inserted"] == response.json()["updated"] == 0
        assert response.json()["duplicates"] == 6
    assert db("SELECT count(*) FROM messages") == [(6,)]
    assert db("SELECT count(*) FROM events") == [(1,)]
    turns = json.loads(body)["data"]["transcript"]
    assert [m["role"] for m in stored] == ["assistant", "user", "tool", "tool", "assistant", "user"]
    assert json.loads(stored[2]["content"]) == turns[2]["tool_calls"][0]
    assert json.loads(stored[3]["content"]) == turns[3]["tool_results"][0]


async def test_missing_wrong_stale_and_future_signatures_are_401(app_client: AppClient, db: Query) -> None:
    body = fixture("post_call_transcription.json")
    good = signed(body)
    cases = {
        "missing": {"content-type": "application/json"},
        "malformed": {"ElevenLabs-Signature": "invalid_format"},
        "wrong secret": signed(body, secret=OTHER),
        "stale": signed(body, age_s=31 * 60),
        "future": signed(body, age_s=-10 * 60),
        "another body": signed(fixture("post_call_transcription_tools.json")),
    }
    async with app_client(**SIGNED) as client:
        messages = {
            name: error_of(await client.post(URL, content=body, headers=headers), 401)
            for name, headers in cases.items()
        }
        altered = await client.post(URL, content=body.replace(b"angelo", b"Angelo"), headers=good)
    assert "missing ElevenLabs-Signature" in messages["missing"]
    assert "malformed" in messages["malformed"]
    assert "does not match" in messages["wrong secret"]
    assert "too old" in messages["stale"]
    assert "in the future" in messages["future"]
    assert "does not match" in messages["another body"]
    assert "does not match" in error_of(altered, 401)
    assert db("SELECT count(*) FROM events") == [(0,)]
    assert db("SELECT count(*) FROM conversations") == [(0,)]


async def test_without_a_secret_every_delivery_is_503(app_client: AppClient, db: Query) -> None:
    body = fixture("post_call_transcription.json")
    async with app_client() as client:
        response = await client.post(URL, content=body, headers=signed(body))
    assert "signing_secret is not set" in error_of(response, 503)
    assert response.headers["retry-after"] == "60"
    assert db("SELECT count(*) FROM events") == [(0,)]


async def test_the_path_token_and_the_signature_are_both_checked(app_client: AppClient) -> None:
    body = fixture("post_call_transcription.json")
    token = "t0ken-Secret-1234"
    async with app_client(**SIGNED, **{"webhooks.elevenlabs.token": token}) as client:
        assert (await client.post(URL, content=body, headers=signed(body))).status_code == 401
        unsigned = await client.post(f"{URL}/{token}", content=body)
        assert "missing ElevenLabs-Signature" in error_of(unsigned, 401)
        ok = await client.post(f"{URL}/{token}", content=body, headers=signed(body))
        assert ok.status_code == 200, ok.text


async def test_a_failed_call_stays_failed(app_client: AppClient) -> None:
    failure = fixture("call_initiation_failure_sip.json")
    async with app_client(**SIGNED) as client:
        response = await client.post(URL, content=failure, headers=signed(failure))
        assert response.status_code == 200, response.text
        assert response.json()["received"] == 0
        record = (await client.get("/conversations/abc")).json()
        assert (record["status"], record["end_reason"], record["ended_at"]) == ("failed", "busy", 1759931652)
        twilio = fixture("call_initiation_failure_twilio.json")
        assert (await client.post(URL, content=twilio, headers=signed(twilio))).json()["duplicates"] == 0
        # An audio event of the same conversation changes none of it.
        audio = fixture("post_call_audio.json")
        assert (await client.post(URL, content=audio, headers=signed(audio))).status_code == 200
        record = (await client.get("/conversations/abc")).json()
    assert (record["status"], record["end_reason"]) == ("failed", "busy")


async def test_unknown_types_are_stored_raw_and_answered_200(app_client: AppClient, db: Query) -> None:
    bodies = [
        json.dumps({"type": "post_call_something_new", "event_timestamp": 1, "data": {"conversation_id": "c-new"}}),
        json.dumps({"type": "voice_removal_notice", "event_timestamp": 2, "data": {"voice_id": "v1"}}),
    ]
    async with app_client(**SIGNED) as client:
        for text in bodies:
            body = text.encode()
            response = await client.post(URL, content=body, headers=signed(body))
            assert response.status_code == 200, response.text
            assert response.json()["received"] == 0
    assert db("SELECT conversation_id, event_type FROM events ORDER BY id") == [
        ("c-new", "post_call_something_new"),
        ("elevenlabs:voice_removal_notice", "voice_removal_notice"),
    ]


async def test_a_bad_turn_is_a_422_naming_it_and_the_rest_is_stored(app_client: AppClient, db: Query) -> None:
    payload = json.loads(fixture("post_call_transcription.json"))
    payload["data"]["transcript"][1]["role"] = "narrator"
    body = json.dumps(payload).encode()
    async with app_client(**SIGNED) as client:
        response = await client.post(URL, content=body, headers=signed(body))
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"]["field"] == "$.data.transcript[1].role"
    assert error["accepted"]["inserted"] == 2
    assert error["accepted"]["rejected"] == 1
    assert db("SELECT seq, role FROM messages ORDER BY seq") == [(0, "assistant"), (2, "assistant")]
    assert db("SELECT count(*) FROM events") == [(1,)]


def audio_body(mp3: bytes, cid: str = "c-audio") -> bytes:
    data = {"agent_id": "a1", "conversation_id": cid, "full_audio": base64.b64encode(mp3).decode()}
    return json.dumps({"type": "post_call_audio", "event_timestamp": 1739537319, "data": data}).encode()


def in_chunks(body: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    # Sent as ElevenLabs sends audio: Transfer-Encoding: chunked, no Content-Length.
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    for piece in in_chunks(body):
        yield piece


async def test_audio_over_the_general_body_limit_is_taken_and_kept_without_its_audio(
    app_client: AppClient, db: Query
) -> None:
    mp3 = bytes(range(256)) * (13 * 4096)  # 13 MiB of MP3: ~17.3 MiB of base64, over ingest.max_body_bytes
    body = audio_body(mp3)
    assert len(body) > 16 * 1024 * 1024
    async with app_client(**SIGNED) as client:
        response = await client.post(URL, content=chunked(body), headers=signed(body))
        assert response.status_code == 200, response.text
        # Another source keeps the general limit.
        tavus = await client.post("/webhooks/tavus", content=chunked(body))
        assert tavus.status_code == 413
        # A body this size is verified in a worker thread: a bad signature is refused all the same.
        forged = await client.post(URL, content=chunked(body), headers=signed(body, secret=OTHER))
        assert "does not match" in error_of(forged, 401)
        stale = await client.post(URL, content=body, headers=signed(body, age_s=3600))
        assert "too old" in error_of(stale, 401)
    ((stored,),) = db("SELECT body FROM events WHERE conversation_id = 'c-audio'")
    assert len(stored) < 400
    encoded = base64.b64encode(mp3)
    assert json.loads(stored)["data"] == {
        "agent_id": "a1",
        "conversation_id": "c-audio",
        "full_audio": {
            "dropped": True,
            "base64_length": len(encoded),
            "base64_sha256": hashlib.sha256(encoded).hexdigest(),
            "mp3_bytes": len(mp3),
        },
    }


async def test_keep_audio_stores_the_body_whole(app_client: AppClient, db: Query) -> None:
    body = audio_body(b"ID3" + bytes(5000))
    async with app_client(**SIGNED, **{"webhooks.elevenlabs.keep_audio": True}) as client:
        response = await client.post(URL, content=chunked(body), headers=signed(body))
    assert response.status_code == 200, response.text
    assert db("SELECT body FROM events") == [(body,)]


async def test_a_body_over_the_elevenlabs_limit_is_413(app_client: AppClient, db: Query) -> None:
    body = audio_body(bytes(3000))
    settings = {**SIGNED, "webhooks.elevenlabs.max_body_bytes": 2048}
    async with app_client(**settings) as client:
        declared = await client.post(URL, content=body, headers=signed(body))
        streamed = await client.post(URL, content=chunked(body), headers=signed(body))
    assert "limit is 2048" in error_of(declared, 413)
    assert "limit of 2048" in error_of(streamed, 413)
    assert db("SELECT count(*) FROM events") == [(0,)]


# Any transcript round-trips through the read API.

turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "agent"]), "message": st.none() | text_content},
    optional={
        "time_in_call_secs": st.integers(min_value=0, max_value=100_000),
        "tool_calls": st.lists(
            st.fixed_dictionaries({"tool_name": st.text(max_size=10), "params_as_json": st.text(max_size=30)}),
            max_size=2,
        ),
        "tool_results": st.lists(
            st.fixed_dictionaries({"result_value": st.text(max_size=30), "is_error": st.booleans()}), max_size=2
        ),
    },
)


@pytest.fixture
def signed_client(storage: Storage) -> Iterator[Client]:
    with running(create_app(storage.config(**SIGNED))) as client:
        yield client


def test_any_transcript_reads_back_exactly(signed_client: Client, storage: Storage) -> None:
    @fuzz(60)
    @given(turns=st.lists(turn, max_size=10))
    def round_trip(turns: list[dict[str, Any]]) -> None:
        cid = fresh_id("el")
        data = {"conversation_id": cid, "transcript": turns, "metadata": {"start_time_unix_secs": 1_760_000_000}}
        body = json.dumps({"type": "post_call_transcription", "event_timestamp": 1, "data": data}).encode()
        response = signed_client.post(URL, content=body, headers=signed(body))
        if storage.refused(response, turns):
            return
        check_answer(response)
        assert response.status_code == 200, response.text
        read = signed_client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
        assert read.status_code == 200, read.text
        got = [
            (m["role"], m["content"] if m["role"] != "tool" else json.loads(m["content"]))
            for m in read.json()["messages"]
        ]
        expected: list[tuple[str, Any]] = []
        for t in turns:
            tools = t.get("tool_calls", []) + t.get("tool_results", [])
            if t["message"] or not tools:
                expected.append(({"user": "user", "agent": "assistant"}[t["role"]], t["message"] or ""))
            expected.extend(("tool", tool) for tool in tools)
        assert got == expected
        assert response.json()["inserted"] == len(expected)

    round_trip()


async def test_enqueued_mode_still_answers_200(app_client: AppClient, db: Query) -> None:
    body = fixture("post_call_transcription.json")
    async with app_client(**SIGNED, **{"ingest.ack": "enqueued"}) as client:
        response = await client.post(URL, content=body, headers=signed(body))
        # Other sources keep 202 for "in the mailbox"; ElevenLabs would count a 202 as a failure.
        tavus = await client.post("/webhooks/tavus", content=b'{"conversation_id": "t1", "event_type": "x"}')
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "enqueued", "received": 3, "rejected": 0}
    assert tavus.status_code == 202
    assert db("SELECT count(*) FROM messages WHERE conversation_id = 'abc'") == [(3,)]  # drained at shutdown


def test_each_rotated_signing_secret_is_masked_in_logs() -> None:
    config = make_config(Path("/dev/null"), **{"webhooks.elevenlabs.signing_secret": f"{SECRET} {OTHER}"})
    mask = RedactSecrets(config_secrets(config))
    line = f"settings: signing_secret={SECRET} {OTHER}; one alone: {OTHER}"
    redacted = mask.redact(line)
    assert SECRET not in redacted
    assert OTHER not in redacted
