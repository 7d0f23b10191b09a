"""Property-based fuzzing of intake through the real app: Tavus payloads valid and broken, and the rejected-request log.

Each test starts the app once (Starlette's TestClient runs its lifespan) and runs many examples against it.
Properties: never a 500; every error in the one JSON shape with a message (and a field for a 422); every valid
transcript reads back exactly, role by role and byte for byte.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from daemon.app import create_app
from daemon.sources.tavus import PROPERTIES
from tests import contract
from tests.conftest import Storage, locked, make_config

TOKEN = "t0ken-Secret-1234"  # in TEST_SECRETS
EVENT_TYPES = sorted(PROPERTIES)


def fuzz(examples: int) -> settings:
    # No example database: a run leaves nothing behind in the working tree.
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


_ids = itertools.count()


def fresh_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


class Client:
    """A blocking client for the app in-process, so Hypothesis can drive it from a sync test.

    (Starlette's TestClient warns that it wants httpx2, and the suite turns warnings into errors.) The app and
    its lifespan run in one event loop thread; server exceptions are raised, not turned into a 500, so a
    failing example shows its traceback.
    """

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self.portal = portal
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(partial(self.client.request, method, url, **kwargs))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)


@contextmanager
def running(app: Starlette) -> Iterator[Client]:
    transport = httpx.ASGITransport(app=app)
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        portal.wrap_async_context_manager(httpx.AsyncClient(transport=transport, base_url="http://fuzz.test")) as http,
    ):
        yield Client(portal, http)


@pytest.fixture
def client(storage: Storage) -> Iterator[Client]:
    with running(create_app(storage.config())) as client:
        yield client


def check_answer(response: httpx.Response) -> None:
    contract.check_answer(response.status_code, response.headers.get, response.json, response.text)


def check_answer_to(response: httpx.Response, storage: Storage, body: bytes) -> None:
    """``check_answer``, where the backend's documented refusal of what ``body`` holds (PostgreSQL: text
    with U+0000, docs/postgresql.md) is the answer expected instead."""
    if not storage.refused(response, decoded(body)):
        check_answer(response)


def decoded(body: bytes) -> Any:
    """The JSON ``body`` holds, or None."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


# --- Strategies ---------------------------------------------------------------------------------------------

EMOJI = "😀🎉👩‍👩‍👧‍👦🏳️‍🌈🇵🇹"
RTL = "مرحبا بالعالم שלום עולם \u202e\u202b\u200f"
CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029\ufeff"

short_text = st.text(max_size=40)
text_content = st.one_of(
    st.text(),
    st.just(""),
    st.text(alphabet=st.sampled_from(EMOJI + RTL + CONTROL + "\x00a"), max_size=200),
    # about 100 KB, of any character
    st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=8), st.integers(10_000, 12_500)),
)
offsets = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)))
timestamps = st.one_of(
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.builds(lambda d: d.isoformat(), st.datetimes(timezones=st.none() | st.just(UTC) | offsets)),
    short_text,  # garbage: dropped, never a reason to refuse the message
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(min_size=1, max_size=64))
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), short_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def transcript_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": draw(roles), "content": draw(text_content | st.none())}
    optional = {
        "timestamp": timestamps,
        "seconds_from_start": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "duration": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "inference_id": st.none() | short_text,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            entry[key] = draw(strategy)
    return entry


@st.composite
def shuffled(draw: st.DrawFn, body: dict[str, Any], extra: bool = True) -> dict[str, Any]:
    """The same object with its keys in any order, and perhaps keys we do not know."""
    if extra:
        body = {**draw(st.dictionaries(short_text.filter(lambda k: k not in body), json_values, max_size=3)), **body}
    return dict(draw(st.permutations(list(body.items()))))


@st.composite
def envelopes(draw: st.DrawFn, event_type: st.SearchStrategy[str], properties: st.SearchStrategy[Any]) -> bytes:
    body = {
        "conversation_id": fresh_id("fz"),
        "event_type": draw(event_type),
        "properties": draw(properties),
        "message_type": draw(st.sampled_from(["application", "system", None])),
        "timestamp": draw(timestamps),
        "webhook_url": f"https://example.test/webhooks/tavus/{TOKEN}",
    }
    return json.dumps(draw(shuffled(body)), ensure_ascii=draw(st.booleans())).encode()


@st.composite
def valid_transcripts(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]], bytes]:
    cid = fresh_id("rt")
    entries = draw(st.lists(transcript_entries().flatmap(lambda e: shuffled(e, extra=False)), max_size=12))
    body = {
        "conversation_id": cid,
        "event_type": "application.transcription_ready",
        "properties": draw(shuffled({"replica_id": "r1", "transcript": entries})),
        "timestamp": draw(timestamps),
    }
    return cid, entries, json.dumps(draw(shuffled(body)), ensure_ascii=draw(st.booleans())).encode()


FIELDS = ("conversation_id", "event_type", "properties", "message_type", "timestamp")
ENTRY_FIELDS = ("role", "content", "timestamp", "seconds_from_start", "duration", "inference_id")


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """A sound transcription_ready with one field (of the envelope, the properties or an entry) of any type."""
    entries = draw(st.lists(transcript_entries(), min_size=1, max_size=4))
    body: dict[str, Any] = {
        "conversation_id": fresh_id("wt"),
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "properties": {"replica_id": "r1", "transcript": entries},
    }
    where = draw(st.sampled_from(("envelope", "properties", "entry")))
    value = draw(json_values)
    if where == "envelope":
        body[draw(st.sampled_from(FIELDS))] = value
    elif where == "properties":
        body["properties"][draw(st.sampled_from(("replica_id", "transcript", "shutdown_reason", "duration")))] = value
    else:
        entries[draw(st.integers(0, len(entries) - 1))][draw(st.sampled_from(ENTRY_FIELDS))] = value
    return json.dumps(body).encode()


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


broken_json = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=200).map(str.encode),
    # valid JSON cut short
    st.tuples(envelopes(st.sampled_from(EVENT_TYPES), json_values), st.integers(0, 10_000)).map(
        lambda pair: pair[0][: pair[1] % max(len(pair[0]), 1)]
    ),
    st.sampled_from(
        [
            b'{"conversation_id": "c", "event_type": NaN}',
            b'{"conversation_id": "c", "event_type": "x",}',
            b"{'conversation_id': 'c'}",
            b'{"conversation_id": "\\ud800", "event_type": "x"}',  # a lone surrogate, escaped
            b'{"conversation_id": "c", "event_type": "\\udfff\\ud800"}',
            b'{"conversation_id": "c\\u0000", "event_type": "x", "properties": {"transcript": []}}',
            b'{"conversation_id": "c", "event_type": "application.transcription_ready", "properties":'
            b' {"transcript": [{"role": "user", "content": "\\ud83d"}]}}',
            b'{"conversation_id": "c", "event_type": "x", "timestamp": 1e999}',
            b'{"conversation_id": "c", "event_type": "x", "timestamp": 123456789012345678901234567890}',
            b"\xef\xbb\xbf{}",
            b"null",
            b"0",
            b'""',
        ]
    ),
)
deep = st.integers(1, 100_000).flatmap(
    lambda depth: st.sampled_from(
        [
            nested(depth).encode(),
            ('{"a":' * depth + "1" + "}" * depth).encode(),
            (
                '{"conversation_id": "deep", "event_type": "application.transcription_ready", "properties":'
                f' {{"transcript": [{nested(depth)}]}}}}'
            ).encode(),
            f'{{"conversation_id": "deep", "event_type": "x", "properties": {nested(depth)}}}'.encode(),
        ]
    )
)
tavus_bodies = st.one_of(
    envelopes(st.sampled_from(EVENT_TYPES), json_values),
    envelopes(st.text(max_size=300), json_values),
    envelopes(st.sampled_from(EVENT_TYPES), st.dictionaries(short_text, json_values, max_size=4)),
    envelopes(
        st.just("application.transcription_ready"),
        st.fixed_dictionaries({"transcript": st.lists(transcript_entries() | json_values, max_size=5)}),
    ),
    wrong_types(),
    broken_json,
    deep,
)


# --- Tests ----------------------------------------------------------------------------------------------------


def test_broken_and_odd_tavus_bodies_never_fail_the_server(client: Client, storage: Storage) -> None:
    @fuzz(400)
    @given(body=tavus_bodies)
    def post(body: bytes) -> None:
        check_answer_to(client.post("/webhooks/tavus", content=body), storage, body)

    post()


def test_broken_and_odd_generic_bodies_never_fail_the_server(client: Client, storage: Storage) -> None:
    message = st.fixed_dictionaries({"role": roles, "content": text_content}, optional={"id": short_text}) | json_values
    bodies = st.one_of(
        st.lists(message, max_size=5).map(lambda m: json.dumps(m).encode()),
        message.map(lambda m: json.dumps(m).encode()),
        broken_json,
        deep,
    )

    @fuzz(150)
    @given(body=bodies, cid=st.text(min_size=0, max_size=300))
    def post(body: bytes, cid: str) -> None:
        response = client.post(f"/conversations/{quote(cid, safe='')}/messages", content=body)
        if not storage.refused(response, cid):
            check_answer_to(response, storage, body)

    post()


def test_every_valid_transcript_reads_back_exactly(client: Client, storage: Storage) -> None:
    @fuzz(120)
    @given(delivery=valid_transcripts())
    def round_trip(delivery: tuple[str, list[dict[str, Any]], bytes]) -> None:
        cid, entries, body = delivery
        response = client.post("/webhooks/tavus", content=body)
        # Any text of the body counts (the envelope's extra fields too), not only the entries'.
        if storage.refused(response, json.loads(body)):
            return
        check_answer(response)
        assert response.status_code == 200, response.text
        assert response.json()["received"] == len(entries)
        read = client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
        assert read.status_code == 200, read.text
        stored = [(m["role"], m["content"]) for m in read.json()["messages"]]
        assert stored == [(e["role"], e["content"] or "") for e in entries]

    round_trip()


def test_every_valid_generic_message_reads_back_exactly(client: Client, storage: Storage) -> None:
    @fuzz(60)
    @given(messages=st.lists(st.fixed_dictionaries({"role": roles, "content": text_content}), min_size=1, max_size=8))
    def round_trip(messages: list[dict[str, str]]) -> None:
        cid = fresh_id("api")
        response = client.post(f"/conversations/{cid}/messages", json=messages)
        if storage.refused(response, messages):
            return
        assert response.status_code == 200, response.text
        read = client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
        assert read.status_code == 200, read.text
        assert [(m["role"], m["content"]) for m in read.json()["messages"]] == [
            (m["role"], m["content"]) for m in messages
        ]

    round_trip()


# --- The rejected-request log ----------------------------------------------------------------------------------


def rejection_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "transcriptd.intake"]


def test_each_rejected_request_is_logged_once_without_token_or_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_body = b'{"conversation_id": "leak-me-not", "event_type": 5}'
    config = make_config(tmp_path / "transcriptd.db", **{"webhooks.tavus.token": TOKEN, "ingest.max_body_bytes": 4096})
    cases: list[tuple[str, str, bytes, int, str, str]] = [
        ("POST", f"/webhooks/tavus/{TOKEN}x", b"{}", 401, "unauthorized", "tavus"),
        ("POST", "/webhooks/tavus", b"{}", 401, "unauthorized", "tavus"),
        ("POST", f"/webhooks/tavus/{TOKEN}", b"{nope", 400, "malformed_json", "tavus"),
        ("POST", f"/webhooks/tavus/{TOKEN}", secret_body, 422, "invalid_payload", "tavus"),
        ("POST", f"/webhooks/tavus/{TOKEN}", b"x" * 5000, 413, "payload_too_large", "tavus"),
        ("POST", "/conversations/c1/messages", b'{"role": 1}', 422, "invalid_payload", "api"),
        ("GET", f"/conversations?cursor={TOKEN}", b"", 422, "invalid_payload", "api"),
        ("GET", "/conversations/nobody-here", b"", 404, "not_found", "api"),
        ("GET", f"/webhooks/tavus/{TOKEN}", b"", 405, "method_not_allowed", "tavus"),
        ("GET", "/nope", b"", 404, "not_found", "other"),
        ("POST", f"/webhooks/vapi/{TOKEN}", b"{}", 401, "unauthorized", "vapi"),
        ("POST", "/webhooks/vapi", b"{nope", 400, "malformed_json", "vapi"),
        ("POST", f"/webhooks/nosuchsource/{TOKEN}", b"{}", 404, "not_found", "other"),
    ]
    with running(create_app(config)) as client:
        for method, path, body, status, reason, source in cases:
            caplog.clear()
            response = client.request(method, path, content=body or None)
            assert response.status_code == status, (path, response.text)
            lines = rejection_lines(caplog)
            assert len(lines) == 1, (path, [r.getMessage() for r in lines])
            (record,) = lines
            text = record.getMessage()
            assert record.levelno == logging.INFO
            assert f"reason={reason}" in text
            assert f"status={status}" in text
            assert f"from {source}:" in text
            assert (f"size={len(body)}" if body else "size=-") in text
            assert TOKEN not in text
            assert "leak-me-not" not in text
            assert "/webhooks/" not in text
            assert "cursor" not in text

        # Accepted requests are not logged as rejections.
        caplog.clear()
        ok = client.post(f"/webhooks/tavus/{TOKEN}", content=b'{"conversation_id": "c", "event_type": "x"}')
        assert ok.status_code == 200
        assert rejection_lines(caplog) == []


def test_a_5xx_rejection_is_logged_as_a_warning(storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Another process holds the database: no commit can come within the ack timeout, a real 503
    # commit_timeout without mocking anything.
    config = storage.config(**{"ingest.ack_timeout_s": 0.05})
    body = json.dumps({"conversation_id": "slow", "event_type": "system.shutdown", "properties": {}}).encode()
    with running(create_app(config)) as client:
        caplog.clear()
        with locked(storage.target):
            response = client.post("/webhooks/tavus", content=body)
        check_answer(response)
        assert response.status_code == 503
        (record,) = rejection_lines(caplog)
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "reason=commit_timeout" in text
    assert f"size={len(body)}" in text
    assert "status=503" in text
