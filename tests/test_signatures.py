"""Standard Webhooks signatures on the Tavus webhook, signed by the reference implementation, through the app."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from daemon.config import ConfigError
from tests.conftest import TEST_SECRETS, AppClient, make_config
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.anyio

Query = Any

SECRET = TEST_SECRETS[TEST_SECRETS.index("whsec_dHJhbnNjcmlwdGQtdGVzdC1zaWduaW5nLWtleS0x")]
OTHER = TEST_SECRETS[TEST_SECRETS.index("whsec_dHJhbnNjcmlwdGQtdGVzdC1zaWduaW5nLWtleS0y")]
SIGNED = {"webhooks.tavus.signing_secret": SECRET}


def signed_headers(body: bytes, *, secret: str = SECRET, msg_id: str = "msg_1", age_s: float = 0) -> dict[str, str]:
    when = datetime.now(tz=UTC) - timedelta(seconds=age_s)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }


def error_of(response: httpx.Response, status: int = 401) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    assert SECRET not in message
    assert OTHER not in message
    return message


async def test_a_valid_signature_is_stored(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-signed", turns=3))
    async with app_client(**SIGNED) as client:
        response = await client.post("/webhooks/tavus", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    assert response.json()["inserted"] == 4
    assert db("SELECT count(*) FROM messages WHERE conversation_id = 'c-signed'") == [(4,)]


async def test_an_altered_body_is_refused_and_nothing_stored(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-tampered", turns=3))
    headers = signed_headers(body)
    tampered = body.replace(b"c-tampered", b"c-tampereD")
    # Same content, other bytes: the signature covers the bytes, not what they decode to.
    reserialised = json.dumps(json.loads(body), indent=1, sort_keys=True).encode()
    assert json.loads(reserialised) == json.loads(body)
    assert reserialised != body
    async with app_client(**SIGNED) as client:
        for altered in (tampered, reserialised, body + b" "):
            message = error_of(await client.post("/webhooks/tavus", content=altered, headers=headers))
            assert "does not match" in message
    assert db("SELECT count(*) FROM events") == [(0,)]
    assert db("SELECT count(*) FROM messages") == [(0,)]


async def test_a_wrong_secret_is_refused(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-wrong", turns=1))
    async with app_client(**SIGNED) as client:
        response = await client.post("/webhooks/tavus", content=body, headers=signed_headers(body, secret=OTHER))
    assert "does not match" in error_of(response)
    assert db("SELECT count(*) FROM events") == [(0,)]


async def test_rotation_accepts_either_secret_and_any_matching_entry(app_client: AppClient, db: Query) -> None:
    first, second, third = (encode(transcription_ready(f"c-rot-{i}", turns=1, seed=i)) for i in range(3))
    async with app_client(**{"webhooks.tavus.signing_secret": f"{SECRET} {OTHER}"}) as client:
        for body, secret, msg_id in ((first, SECRET, "m1"), (second, OTHER, "m2")):
            headers = signed_headers(body, secret=secret, msg_id=msg_id)
            response = await client.post("/webhooks/tavus", content=body, headers=headers)
            assert response.status_code == 200, response.text
    async with app_client(**SIGNED) as client:
        # The sender signs with the old and the new secret while it rotates: one match is enough.
        headers = signed_headers(third, secret=OTHER, msg_id="m3")
        valid = signed_headers(third, msg_id="m3")["webhook-signature"]
        headers["webhook-signature"] = f"{headers['webhook-signature']} v1a,bm90LW91cnM= {valid}"
        response = await client.post("/webhooks/tavus", content=third, headers=headers)
        assert response.status_code == 200, response.text
    assert db("SELECT DISTINCT conversation_id FROM messages ORDER BY 1") == [("c-rot-0",), ("c-rot-1",), ("c-rot-2",)]


@pytest.mark.parametrize(("age_s", "named"), [(301, "too old"), (-301, "in the future")])
async def test_a_timestamp_beyond_the_tolerance_is_refused(
    app_client: AppClient, db: Query, age_s: float, named: str
) -> None:
    body = encode(transcription_ready("c-stale", turns=1))
    async with app_client(**SIGNED) as client:
        late = await client.post("/webhooks/tavus", content=body, headers=signed_headers(body, age_s=age_s))
        assert named in error_of(late)
        # Well inside the tolerance either way is fine (a sender's clock is never exact).
        near = signed_headers(body, age_s=age_s / 2)
        assert (await client.post("/webhooks/tavus", content=body, headers=near)).status_code == 200
    assert db("SELECT count(*) FROM events") == [(1,)]


async def test_the_tolerance_is_configurable(app_client: AppClient) -> None:
    body = encode(transcription_ready("c-tol", turns=1))
    async with app_client(**SIGNED, **{"webhooks.tavus.signature_tolerance_s": 30}) as client:
        response = await client.post("/webhooks/tavus", content=body, headers=signed_headers(body, age_s=120))
    assert "too old (more than 30 s ago)" in error_of(response)


async def test_a_replayed_delivery_is_answered_and_stored_once(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-replay", turns=5))
    headers = signed_headers(body, msg_id="msg_replayed")
    async with app_client(**SIGNED) as client:
        first = await client.post("/webhooks/tavus", content=body, headers=headers)
        again = await client.post("/webhooks/tavus", content=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["inserted"] == 6
    assert again.json()["inserted"] == 0
    assert db("SELECT count(*) FROM events") == [(1,)]
    assert db("SELECT count(*) FROM messages") == [(6,)]


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
async def test_a_missing_header_is_named(app_client: AppClient, db: Query, missing: str) -> None:
    body = encode(transcription_ready("c-missing", turns=1))
    headers = signed_headers(body)
    del headers[missing]
    async with app_client(**SIGNED) as client:
        response = await client.post("/webhooks/tavus", content=body, headers=headers)
    assert f"missing {missing} header" in error_of(response)
    assert db("SELECT count(*) FROM events") == [(0,)]


@pytest.mark.parametrize(
    ("header", "value", "named"),
    [
        ("webhook-timestamp", "yesterday", "malformed webhook-timestamp"),
        ("webhook-signature", "v1", "malformed webhook-signature"),
        ("webhook-signature", "v1,not*base64!", "not base64"),
        ("webhook-signature", "v1a,bm90LW91cnM=", "no v1 signature"),
    ],
)
async def test_a_malformed_header_is_named(app_client: AppClient, header: str, value: str, named: str) -> None:
    body = encode(transcription_ready("c-malformed", turns=1))
    headers = {**signed_headers(body), header: value}
    async with app_client(**SIGNED) as client:
        response = await client.post("/webhooks/tavus", content=body, headers=headers)
    assert named in error_of(response)


async def test_the_path_token_and_the_signature_are_both_checked(app_client: AppClient, db: Query) -> None:
    token = TEST_SECRETS[TEST_SECRETS.index("t0ken-Secret-1234")]
    body = encode(transcription_ready("c-both", turns=1))
    async with app_client(**SIGNED, **{"webhooks.tavus.token": token}) as client:
        unsigned = await client.post(f"/webhooks/tavus/{token}", content=body)
        assert "missing webhook-id" in error_of(unsigned)
        no_token = await client.post("/webhooks/tavus", content=body, headers=signed_headers(body))
        assert "token" in error_of(no_token)
        both = await client.post(f"/webhooks/tavus/{token}", content=body, headers=signed_headers(body))
        assert both.status_code == 200, both.text
    assert db("SELECT count(*) FROM events") == [(1,)]


async def test_without_a_signing_secret_signatures_are_not_required(app_client: AppClient) -> None:
    body = encode(transcription_ready("c-unsigned", turns=1))
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=body)).status_code == 200


@pytest.mark.parametrize("setting", ["whsec_not*base64", "whsec_", f"{SECRET} nope!"])
def test_an_unusable_signing_secret_stops_start_up(db_path: Path, setting: str) -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.tavus: signing secret #") as raised:
        make_config(db_path, **{"webhooks.tavus.signing_secret": setting})
    assert SECRET not in str(raised.value)


async def test_a_declared_body_over_the_inflight_budget_is_refused_before_it_is_read(
    app_client: AppClient, db_path: Path, db: Query
) -> None:
    settings = {"ingest.ack": "enqueued", "ingest.max_inflight_mib": 1, "ingest.retry_after_s": 4}
    size = 4 * 1024 * 1024  # under ingest.max_body_bytes: not a 413
    consumed: list[int] = []

    async def large() -> AsyncIterator[bytes]:
        for _ in range(size // 65536):
            consumed.append(1)
            yield b" " * 65536

    async with app_client(**settings) as client:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # nothing commits: the first delivery stays in flight
        try:
            small = encode(transcription_ready("c-inflight", turns=1))
            assert (await client.post("/webhooks/tavus", content=small)).status_code == 202
            headers = {"content-length": str(size)}
            response = await client.post("/webhooks/tavus", content=large(), headers=headers)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["retry-after"] == "4"
    assert not consumed, "the body was read before it was refused"
    assert db("SELECT DISTINCT conversation_id FROM messages") == [("c-inflight",)]


@pytest.mark.parametrize("digits", [13, 400, 5000])
async def test_an_absurd_timestamp_is_a_401_not_a_500(app_client: AppClient, digits: int) -> None:
    headers = {"webhook-id": "msg_x", "webhook-timestamp": "9" * digits, "webhook-signature": "v1,AAAA"}
    async with app_client(**{"webhooks.tavus.signing_secret": SECRET}) as client:
        response = await client.post("/webhooks/tavus", content=b"{}", headers=headers)
    assert response.status_code == 401
    assert "malformed" in response.json()["error"]["message"]
