"""The delivery log: one info line per delivery on ``transcriptd.deliveries``, whatever its outcome, through the
real app; its fields as keys in the JSON format; off with ``logging.deliveries = false``; no token in it."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import delivery_log
from daemon.config import load_config
from daemon.inflight import InFlight
from daemon.logs import JsonFormatter, RedactSecrets, configure
from storage.deliveries import Record
from tests.conftest import TEST_SECRETS, AppClient, locked, make_config
from tests.payloads import encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

LOGGER = "transcriptd.deliveries"
TOKEN = "t0ken-Secret-1234"  # in TEST_SECRETS
WEBHOOK_URL_TOKEN = "s3cr3t-callback-token"  # echoed in every Tavus body's webhook_url (in TEST_SECRETS)
assert TOKEN in TEST_SECRETS
assert WEBHOOK_URL_TOKEN in TEST_SECRETS


def delivery_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's arguments by name, as the JSON format gives them."""
    names = record.fields  # type: ignore[attr-defined]
    args = getattr(record, "field_args", record.args)
    assert isinstance(args, tuple)
    return dict(zip(names, args, strict=True))


async def test_each_outcome_is_one_line_with_conversation_counts_and_latency(
    app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transcript = encode(transcription_ready("c-log", turns=4))
    bad_entry = transcription_ready("c-log-partial", turns=3)
    bad_entry["properties"]["transcript"][2]["role"] = 7
    cases: list[tuple[str, str, bytes, dict[str, Any]]] = [
        ("stored", "/webhooks/tavus", transcript, {"received": 5, "inserted": 5, "duplicates": 0}),
        ("duplicate", "/webhooks/tavus", transcript, {"received": 5, "inserted": 0, "duplicates": 5}),
        (
            "partial",
            "/webhooks/tavus",
            encode(bad_entry),
            {"status": 422, "received": 4, "inserted": 3, "rejected": 1, "field": "$.properties.transcript[2].role"},
        ),
        (
            "rejected",
            "/webhooks/tavus",
            b'{"conversation_id": "c-log-bad", "event_type": 5}',
            {"status": 422, "conversation": "c-log-bad", "reason": "invalid_payload", "field": "$.event_type"},
        ),
        ("rejected", "/webhooks/tavus", b"{nope", {"status": 400, "conversation": None, "reason": "malformed_json"}),
        (
            "partial",  # every item refused, but the raw event is kept: a 422 with `accepted`
            "/conversations/c-log-api/messages",
            b'[{"role": "user"}]',
            {"status": 422, "conversation": "c-log-api", "received": 1, "rejected": 1, "field": "$[0]"},
        ),
        (
            "rejected",
            "/conversations/c-log-api/messages",
            b'{"role": 1, "content": "x"}',
            {"status": 422, "conversation": "c-log-api", "reason": "invalid_payload", "field": "$.role"},
        ),
    ]
    async with app_client(**{"ingest.max_body_bytes": 4096 * 64}) as client:
        for outcome, url, body, expected in cases:
            caplog.clear()
            response = await client.post(url, content=body)
            (record,) = delivery_lines(caplog)
            got = fields(record)
            assert record.levelno == logging.INFO
            assert got["outcome"] == outcome, (got, response.text)
            assert got["status"] == response.status_code
            assert got["bytes"] == len(body)
            assert got["latency_ms"] >= 0
            for key, value in expected.items():
                assert got[key] == value, (key, got)
            if outcome in ("stored", "duplicate", "partial") and url == "/webhooks/tavus":
                assert got["conversation"] in ("c-log", "c-log-partial")
                assert got["event_type"] == "application.transcription_ready"
            text = record.getMessage()
            assert f"delivery {outcome}:" in text
            assert WEBHOOK_URL_TOKEN not in text


async def test_rejections_before_the_body_name_what_is_known(
    app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with app_client(**{"webhooks.tavus.token": TOKEN, "ingest.max_body_bytes": 100}) as client:
        caplog.clear()
        assert (await client.post("/webhooks/tavus/wrong", content=b"{}")).status_code == 401
        (unauthorized,) = delivery_lines(caplog)
        caplog.clear()
        too_big = await client.post(f"/webhooks/tavus/{TOKEN}", content=b"x" * 500)
        assert too_big.status_code == 413
        (large,) = delivery_lines(caplog)
        caplog.clear()
        bad_id = await client.post("/conversations/%FF%FE/messages", json={"role": "user", "content": "x"})
        assert bad_id.status_code == 400
        (malformed,) = delivery_lines(caplog)
    assert fields(unauthorized) | {"latency_ms": 0} == fields(unauthorized) | {
        "outcome": "rejected",
        "source": "tavus",
        "status": 401,
        "reason": "unauthorized",
        "conversation": None,
        "latency_ms": 0,
    }
    assert fields(large)["reason"] == "payload_too_large"
    assert fields(malformed)["conversation"] == "%FF%FE"  # named as it came, percent-encoded
    assert fields(malformed)["reason"] == "malformed_id"
    for record in (unauthorized, large, malformed):
        assert TOKEN not in record.getMessage()
        assert "/webhooks/tavus/" not in record.getMessage()


async def test_enqueued_timeout_and_storage_faults_are_logged(
    app_client: AppClient, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    body = encode(envelope("c-log-modes", "system.shutdown", {"shutdown_reason": "end_call"}))
    async with app_client(**{"ingest.ack": "enqueued"}) as client:
        caplog.clear()
        assert (await client.post("/webhooks/tavus", content=body)).status_code == 202
        (enqueued,) = delivery_lines(caplog)
    async with app_client(**{"ingest.ack_timeout_s": 0.05}) as client:
        caplog.clear()
        with locked(target):
            late = await client.post("/conversations/c-log-late/messages", json={"role": "user", "content": "x"})
        (timeout,) = delivery_lines(caplog)
    async with app_client(**{"storage.busy_timeout_ms": 20}) as client:
        caplog.clear()
        with locked(target):
            down = await client.post("/conversations/c-log-down/messages", json={"role": "user", "content": "x"})
        (unavailable,) = delivery_lines(caplog)
    assert fields(enqueued)["outcome"] == "enqueued"
    assert fields(enqueued)["status"] == 202
    assert late.status_code == down.status_code == 503
    assert fields(timeout)["outcome"] == "timeout"
    assert fields(timeout)["conversation"] == "c-log-late"
    assert fields(unavailable)["outcome"] == "unavailable"
    assert fields(unavailable)["reason"] == "storage_unavailable"


async def test_the_setting_turns_it_off(app_client: AppClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with app_client(**{"logging.deliveries": False}) as client:
        assert (
            await client.post("/webhooks/tavus", content=encode(transcription_ready("c-off", 2)))
        ).status_code == 200
        assert (await client.post("/webhooks/tavus", content=b"{nope")).status_code == 400
    assert delivery_lines(caplog) == []
    assert (
        load_config(Path("/dev/null"), environ={"TRANSCRIPTD_LOGGING_DELIVERIES": "false"}).logging.deliveries is False
    )
    assert load_config(Path("/dev/null"), environ={}).logging.deliveries is True


async def test_the_json_format_carries_the_fields_as_keys_masked(app_client: AppClient, db_path: Path) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = make_config(db_path, **{"logging.format": "json", "webhooks.tavus.token": TOKEN})
    configure(config, stream=stream)
    try:
        async with app_client(**{"webhooks.tavus.token": TOKEN}) as client:
            body = encode(transcription_ready("c-json", turns=2))
            assert (await client.post(f"/webhooks/tavus/{TOKEN}", content=body)).status_code == 200
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (entry,) = [line for line in lines if line["logger"] == LOGGER]
    assert entry["outcome"] == "stored"
    assert entry["conversation"] == "c-json"
    assert entry["event_type"] == "application.transcription_ready"
    assert (entry["received"], entry["inserted"], entry["duplicates"], entry["rejected"]) == (3, 3, 0, 0)
    assert entry["source"] == "tavus"
    assert isinstance(entry["latency_ms"], float)
    assert TOKEN not in stream.getvalue()
    assert WEBHOOK_URL_TOKEN not in stream.getvalue()


def test_the_keys_are_masked_like_the_message() -> None:
    # Straight to one handler, not through the root logger: the session's leak check must not see the token.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    mask = RedactSecrets([TOKEN])
    handler.setFormatter(JsonFormatter(mask))
    handler.addFilter(mask)
    record = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, delivery_log.FORMAT, None, None)
    record.args = ("stored", f"c-{TOKEN}", "tavus", "e", 200, 1, 1, 0, 0, 0, 10, 1.5, None, None)
    record.fields = delivery_log.FIELDS
    handler.handle(record)
    entry = json.loads(stream.getvalue())
    assert entry["conversation"] == "c-[redacted]"
    assert entry["latency_ms"] == 1.5
    assert entry["reason"] is None
    assert TOKEN not in stream.getvalue()


def test_the_record_is_the_one_log_info_makes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    record = Record(
        key="k", source="tavus", event_type="system.shutdown", conversation_id="c-rec", received_at=1.0, body=b"{}"
    )
    delivery = InFlight(record)
    delivery_log.enqueued(delivery, time.perf_counter())
    (ours,) = delivery_lines(caplog)
    logging.getLogger(LOGGER).info(delivery_log.FORMAT, *ours.args, extra=delivery_log.EXTRA)  # type: ignore[misc]
    standard = delivery_lines(caplog)[1]
    assert set(vars(ours)) == set(vars(standard))
    for name in ("name", "msg", "args", "levelno", "levelname", "fields", "exc_info", "exc_text", "stack_info"):
        assert getattr(ours, name) == getattr(standard, name), name
    assert ours.getMessage() == standard.getMessage()
    assert standard.created - 1 <= ours.created <= standard.created
    assert 0 <= ours.msecs < 1000
    assert ours.relativeCreated <= standard.relativeCreated
