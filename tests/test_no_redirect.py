"""No redirect, and so no secret in a Location: every route answers with or without a trailing slash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from daemon.routes import ENDPOINTS
from tests.conftest import AppClient
from tests.payloads import encode, transcription_ready

TAVUS_TOKEN = "t0ken-Secret-1234"
# A stream never ends by itself in-process (it ends when its client goes, or the server stops): its GET is
# checked against a real daemon, with its slash too (tests/test_change_stream.py); its other methods (HEAD
# answers headers only) here.
STREAMS = {"/changes/stream"}


@pytest.mark.anyio
async def test_a_trailing_slash_is_served_not_redirected_and_no_answer_has_a_location(
    app_client: AppClient, db: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
) -> None:
    answers: list[httpx.Response] = []
    async with app_client(**{"webhooks.tavus.token": TAVUS_TOKEN}) as client:
        body = encode(transcription_ready("c-slash", turns=2))
        stored = await client.post(f"/webhooks/tavus/{TAVUS_TOKEN}/", content=body)
        assert stored.status_code == 200, stored.text
        assert stored.json()["inserted"] == 3  # two turns and the system entry
        answers.append(stored)
        # Every route, with and without its slash, and near misses around the token path.
        paths = {e.path.replace("{conversation_id}", "c-slash").replace("{token}", TAVUS_TOKEN) for e in ENDPOINTS}
        paths |= {
            f"/webhooks/tavus/{TAVUS_TOKEN}x",
            f"/webhooks/tavus/{TAVUS_TOKEN}//",
            f"/webhooks/tavus/{TAVUS_TOKEN}/extra",
            f"/webhooks/tavus/{TAVUS_TOKEN}/extra/",
            f"/webhooks//tavus/{TAVUS_TOKEN}/",
            f"/Webhooks/tavus/{TAVUS_TOKEN}/",
        }
        for path in sorted(paths):
            for variant in {path, path.rstrip("/") or "/", path.rstrip("/") + "/"}:
                for method in ("GET", "POST", "HEAD", "PUT"):
                    if method == "GET" and variant.rstrip("/") in STREAMS:
                        continue
                    answers.append(await client.request(method, variant, content=body))
        by_slash = {path: (await client.get(path)).status_code for path in ("/livez", "/livez/", "/readyz", "/readyz/")}
    # Stored, in the database file: the slash form is the same callback as the one without.
    assert db("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", ("c-slash",)) == [(3,)]
    assert by_slash == {"/livez": 200, "/livez/": 200, "/readyz": 200, "/readyz/": 200}
    assert len(answers) > 50
    for answer in answers:
        where = f"{answer.request.method} {answer.request.url.path} -> {answer.status_code}"
        assert not 300 <= answer.status_code < 400, where
        assert "location" not in answer.headers, where
        assert not [value for value in answer.headers.values() if TAVUS_TOKEN in value], where
