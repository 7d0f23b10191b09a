"""Vapi server messages: the docs' examples parsed into the normalised model, keys that survive changing
presigned URLs, and problems named without losing the good entries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.errors import InvalidPayload, MalformedJSON
from daemon.sources import vapi
from storage.deliveries import Record

FIXTURES = Path(__file__).parent / "fixtures" / "vapi"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parsed(body: bytes, at: float = 1_800_000_000.0) -> tuple[Record, list[Any]]:
    return vapi.parse(body, {}, received_at=at)


def rows(delivery: Record) -> list[tuple[Any, ...]]:
    """(seq, role, vendor_role, content) per row, NULL (NaN) as None."""
    return [tuple(None if v != v else v for v in (r[2], r[3], r[9], r[4])) for r in delivery.rows]


def test_the_docs_end_of_call_report() -> None:
    delivery, problems = parsed(fixture("events-end-of-call-report.json"))
    assert problems == []
    assert (delivery.source, delivery.event_type, delivery.conversation_id) == (
        "vapi",
        "end-of-call-report",
        "docs-events-end-of-call-report",
    )
    assert rows(delivery) == [(0, "assistant", None, "How can I help?"), (1, "user", None, "What's the weather?")]
    patch = delivery.patch
    assert (patch.status, patch.end_reason) == ("ended", "hangup")
    assert patch.recording_uri == "https://recordings.example.com/docs-events/mono.wav"
    assert patch.analysis is None


def test_a_report_with_tools_times_analysis_and_recording() -> None:
    delivery, problems = parsed(fixture("schema-end-of-call-report-with-tools.json"))
    assert problems == []
    assert rows(delivery) == [
        (0, "system", None, "You are a helpful weather assistant."),
        (1, "assistant", "bot", "Hello."),
        (2, "user", None, "What's the weather in Lisbon?"),
        (3, "tool", "tool_calls", delivery.rows[3][4]),
        (4, "tool", "tool_call_result", delivery.rows[4][4]),
        (5, "assistant", "bot", "It is sunny in Lisbon."),
    ]
    # A tool call is the calls as JSON; a result is its id, name and result as JSON.
    assert json.loads(delivery.rows[3][4]) == [
        {
            "id": "call_weather_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
        }
    ]
    assert json.loads(delivery.rows[4][4]) == {
        "toolCallId": "call_weather_1",
        "name": "get_weather",
        "result": '{"forecast": "sunny"}',
    }
    # time is epoch ms: stored in seconds; secondsFromStart as is; duration raw.
    bot = delivery.rows[1]
    assert bot[5] == pytest.approx(1744364969.064)
    assert (bot[6], bot[7]) == (1.44, 320)
    duration = delivery.rows[4][7]
    assert duration is not None
    assert math.isnan(duration)  # no duration given: NULL
    assert delivery.last_message_at == pytest.approx(1744364973.8)
    patch = delivery.patch
    assert (patch.status, patch.end_reason) == ("ended", "customer-ended-call")
    assert patch.started_at == pytest.approx(1744364967.624)
    assert patch.ended_at == pytest.approx(1744364975.012)
    # The stable URL, never the presigned one (it expires).
    assert patch.recording_uri == "https://storage.vapi.ai/schema-call-with-tools-mono.wav"
    assert json.loads(patch.analysis or "") == {
        "summary": "The caller asked for the weather in Lisbon and was told it is sunny.",
        "structuredData": {"city": "Lisbon"},
        "successEvaluation": "true",
    }


def test_the_docs_recording_consent_report_keeps_its_deprecated_recording_url() -> None:
    delivery, problems = parsed(fixture("recording-consent-end-of-call-report.json"))
    assert problems == []
    assert delivery.rows == []
    assert delivery.patch.recording_uri == "https://..."
    assert delivery.patch.end_reason == "assistantEndedCall"
    assert delivery.patch.ended_at == pytest.approx(1705314900.0)


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("customer-did-not-answer", "failed"),
        ("customer-busy", "failed"),
        ("twilio-failed-to-connect-call", "failed"),
        ("call.start.error-get-assistant", "failed"),
        ("call.ringing.error-sip-inbound-call-failed-to-connect", "failed"),
        ("customer-ended-call", "ended"),
        ("assistant-ended-call", "ended"),
        ("voicemail", "ended"),
        (None, "ended"),
    ],
)
def test_a_call_that_never_connected_is_failed_with_its_reason(reason: str | None, status: str) -> None:
    for name in ("events-end-of-call-report.json", "events-status-update.json"):
        body = json.loads(fixture(name))
        body["message"]["endedReason"] = reason
        delivery, problems = parsed(json.dumps(body).encode())
        assert problems == []
        assert (delivery.patch.status, delivery.patch.end_reason) == (status, reason)


def test_status_updates() -> None:
    ended, _ = parsed(fixture("events-status-update.json"))
    assert (ended.event_type, ended.patch.status) == ("status-update", "ended")
    body = json.loads(fixture("events-status-update.json"))
    body["message"].update(status="in-progress", timestamp=1744364967624)
    started, _ = parsed(json.dumps(body).encode())
    assert started.patch.status is None
    assert started.patch.started_at == pytest.approx(1744364967.624)
    assert started.key != ended.key  # each status is its own delivery


def test_a_conversation_update_is_a_snapshot_by_position() -> None:
    delivery, problems = parsed(fixture("events-conversation-update.json"))
    assert problems == []
    assert rows(delivery) == [(0, "assistant", None, "How can I help?"), (1, "user", None, "What's the weather?")]
    assert delivery.patch.status is None


def test_other_types_are_kept_raw() -> None:
    delivery, problems = parsed(fixture("events-hang.json"))
    assert (problems, delivery.rows, delivery.event_type) == ([], [], "hang")
    assert delivery.body == fixture("events-hang.json")


def test_the_key_is_never_a_hash_of_the_body() -> None:
    first = json.loads(fixture("schema-end-of-call-report-with-tools.json"))
    again = json.loads(fixture("schema-end-of-call-report-with-tools.json"))
    again["message"]["artifact"]["presignedMonoUrl"] += "&X-Amz-Date=later"
    a, _ = parsed(json.dumps(first).encode(), at=1.0)
    b, _ = parsed(json.dumps(again).encode(), at=2.0)
    assert a.key == b.key == "vapi:schema-call-with-tools:end-of-call-report"
    # Snapshots are told apart by their timestamp; a re-sent one is the same delivery.
    snap = json.loads(fixture("events-conversation-update.json"))
    keys = set()
    for stamp, at in ((1000, 1.0), (2000, 2.0), (2000, 3.0)):
        snap["message"]["timestamp"] = stamp
        keys.add(parsed(json.dumps(snap).encode(), at=at)[0].key)
    assert len(keys) == 2


def test_a_bad_entry_is_named_and_the_others_kept() -> None:
    body = json.loads(fixture("schema-end-of-call-report-with-tools.json"))
    entries = body["message"]["artifact"]["messages"]
    entries[2]["role"] = "narrator"
    entries[4]["secondsFromStart"] = "soon"
    delivery, problems = parsed(json.dumps(body).encode())
    assert [p.field for p in problems] == [
        "$.message.artifact.messages[2].role",
        "$.message.artifact.messages[4].secondsFromStart",
    ]
    assert "narrator" in problems[0].message
    assert [r[2] for r in delivery.rows] == [0, 1, 3, 5]  # the others keep their positions
    assert delivery.rejected == 2


def test_a_field_of_the_wrong_type_keeps_the_raw_message() -> None:
    body = json.loads(fixture("events-status-update.json"))
    body["message"]["status"] = 5
    delivery, problems = parsed(json.dumps(body).encode())
    assert problems
    assert problems[0].field == "$.message.status"
    assert (delivery.conversation_id, delivery.rows) == ("docs-events-status-update", [])


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        (b"{not json", MalformedJSON, None),
        (b'{"message": {"type": "end-of-call-report"}}', InvalidPayload, "$.message.call.id"),
        (b'{"message": {"call": {"id": "x"}}}', InvalidPayload, "$.message"),
        (b'{"message": {"type": "hang", "call": {"id": ""}}}', InvalidPayload, "$.message.call.id"),
    ],
)
def test_what_cannot_be_stored_at_all(body: bytes, error: type[Exception], field: str | None) -> None:
    with pytest.raises(error) as raised:
        parsed(body)
    if field is not None:
        assert isinstance(raised.value, InvalidPayload)
        assert raised.value.problems[0].field == field


def test_the_documented_body_says_what_parse_reads() -> None:
    _, components = msgspec.json.schema_components([vapi.VapiServerMessage])
    message = components["DocumentedMessage"]
    assert set(message["required"]) == {"type", "call"}
    assert components["DocumentedCall"]["required"] == ["id"]
    assert set(components["VapiMessage"]["properties"]["role"]["enum"]) == set(vapi.ROLES)
    # What the documented body allows, parse takes: the docs' examples and the schema-built one.
    for name in ("events-end-of-call-report.json", "schema-end-of-call-report-with-tools.json"):
        msgspec.json.decode(fixture(name), type=vapi.VapiServerMessage)
