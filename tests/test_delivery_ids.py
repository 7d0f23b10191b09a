"""Sender-supplied ids are bounded: a ``webhook-id`` or ``Idempotency-Key`` becomes a stored, unique delivery
key, so one of megabytes is refused with a 400 naming its header, and nothing of the delivery is stored."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.decoding import MAX_ID_CHARS
from tests.conftest import AppClient
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.anyio

Query = Any


@pytest.mark.parametrize("header", ["webhook-id", "idempotency-key"])
async def test_an_over_long_id_header_is_refused_naming_it_and_nothing_is_stored(
    app_client: AppClient, db: Query, header: str
) -> None:
    body = encode(transcription_ready("c-long-id", turns=3))
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=body, headers={header: "i" * (MAX_ID_CHARS + 1)})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_header"
        assert error["field"] == f"headers.{header}"
        assert header in error["message"]
        generic = await client.post(
            "/conversations/c-long-id/messages",
            content=b'{"role": "user", "content": "hi"}',
            headers={header: "i" * 8_000_000},
        )
        assert generic.status_code == 400, generic.text
        assert generic.json()["error"]["field"] == f"headers.{header}"
    assert db("SELECT count(*) FROM events") == [(0,)]
    assert db("SELECT count(*) FROM messages") == [(0,)]


async def test_an_id_at_the_limit_is_the_delivery_key(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-max-id", turns=3))
    given = "k" * MAX_ID_CHARS
    async with app_client() as client:
        first = await client.post("/webhooks/tavus", content=body, headers={"webhook-id": given})
        again = await client.post("/webhooks/tavus", content=body, headers={"webhook-id": given})
    assert (first.status_code, again.status_code) == (200, 200), (first.text, again.text)
    assert again.json()["inserted"] == 0
    assert db("SELECT delivery_key FROM events") == [(f"tavus:id:c-max-id:{given}",)]
