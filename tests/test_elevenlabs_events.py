"""The ElevenLabs bodies mapped to messages and conversation fields: the docs' own examples, every edge, and
arbitrary transcripts (Hypothesis)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import InvalidPayload, MalformedJSON
from daemon.sources.elevenlabs_events import parse_event
from daemon.sources.model import Message

FIXTURES = Path(__file__).parent / "fixtures" / "elevenlabs"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def transcription(turns: list[dict[str, Any]], *, cid: str = "c1", at: int = 1_760_000_000, **data: Any) -> bytes:
    meta = {"start_time_unix_secs": at, "call_duration_secs": 30, "termination_reason": "end_call tool"}
    payload = {"conversation_id": cid, "transcript": turns, "metadata": meta, **data}
    return body_of({"type": "post_call_transcription", "event_timestamp": at + 40, "data": payload})


def test_the_docs_transcription_example() -> None:
    event, problems = parse_event(fixture("post_call_transcription.json"))
    assert problems == []
    assert (event.event_type, event.conversation_id) == ("post_call_transcription", "abc")
    assert event.key == "elevenlabs:post_call_transcription:1739537297:abc"
    assert event.stored_body == fixture("post_call_transcription.json")
    assert [(m.seq, m.role, m.vendor_role, m.seconds_from_start, m.timestamp) for m in event.messages] == [
        (0, "assistant", "agent", 0, 1739537297),
        (1, "user", "user", 2, 1739537299),
        (2, "assistant", "agent", 9, 1739537306),
    ]
    original = json.loads(fixture("post_call_transcription.json"))["data"]
    assert [m.content for m in event.messages] == [turn["message"] for turn in original["transcript"]]
    call = event.call
    assert (call.status, call.started_at, call.ended_at) == ("ended", 1739537297, 1739537297 + 22)
    assert call.end_reason is None  # the example's termination_reason is ""
    assert call.analysis is not None
    assert json.loads(call.analysis) == original["analysis"]


def test_tool_calls_and_results_become_tool_messages_in_order() -> None:
    event, problems = parse_event(fixture("post_call_transcription_tools.json"))
    assert problems == []
    original = json.loads(fixture("post_call_transcription_tools.json"))["data"]
    turns = original["transcript"]
    assert [(m.seq, m.role) for m in event.messages] == [
        (0, "assistant"),
        (1, "user"),
        (2, "tool"),
        (3, "tool"),
        (4, "assistant"),
        (5, "user"),
    ]
    assert json.loads(event.messages[2].content) == turns[2]["tool_calls"][0]
    assert json.loads(event.messages[3].content) == turns[3]["tool_results"][0]
    assert event.messages[2].vendor_role == event.messages[3].vendor_role == "agent"
    # What was said, not what was planned before the interruption (that stays in the raw event).
    assert event.messages[4].content == "Yes, it shipped with UPS yesterday."
    assert event.call.end_reason == "Client disconnected: 1000"
    assert event.call.ended_at == 1760000014


def test_a_turn_with_text_and_tools_gives_the_text_first_then_calls_then_results() -> None:
    call = {"request_id": "r1", "tool_name": "t", "params_as_json": "{}", "tool_has_been_called": True}
    result = {"request_id": "r1", "tool_name": "t", "result_value": "ok", "is_error": False}
    turns: list[dict[str, Any]] = [
        {"role": "agent", "message": "Let me check.", "tool_calls": [call, call], "tool_results": [result]},
        {"role": "agent", "message": None, "time_in_call_secs": 3},  # nothing at all: an empty message
        {"role": "user", "message": ""},
    ]
    event, problems = parse_event(transcription(turns))
    assert problems == []
    assert [(m.seq, m.role, m.content[:13]) for m in event.messages] == [
        (0, "assistant", "Let me check."),
        (1, "tool", '{"request_id"'),
        (2, "tool", '{"request_id"'),
        (3, "tool", '{"request_id"'),
        (4, "assistant", ""),
        (5, "user", ""),
    ]
    assert json.loads(event.messages[3].content) == result
    assert event.messages[0].timestamp is None  # no time_in_call_secs: no time


def test_both_call_initiation_failure_examples_are_failed_calls_with_their_reason() -> None:
    for name in ("call_initiation_failure_twilio.json", "call_initiation_failure_sip.json"):
        event, problems = parse_event(fixture(name))
        assert problems == []
        assert event.key == "elevenlabs:call_initiation_failure:1759931652:abc"
        assert (event.call.status, event.call.end_reason, event.call.ended_at) == ("failed", "busy", 1759931652)
        assert event.messages == []
        assert event.stored_body == fixture(name)


def test_a_failure_without_a_reason_is_still_failed() -> None:
    body = body_of({"type": "call_initiation_failure", "event_timestamp": 5, "data": {"conversation_id": "c"}})
    event, _ = parse_event(body)
    assert (event.call.status, event.call.end_reason) == ("failed", "call initiation failed")


def audio_body(audio: str | None, **extra: Any) -> bytes:
    data = {"agent_id": "a1", "conversation_id": "c-audio", "full_audio": audio, **extra}
    return body_of({"type": "post_call_audio", "event_timestamp": 1739537319, "data": data})


def test_the_docs_audio_example_is_kept_without_its_audio() -> None:
    event, problems = parse_event(fixture("post_call_audio.json"))
    assert problems == []
    stored = json.loads(event.stored_body)
    original = json.loads(fixture("post_call_audio.json"))
    # The docs' placeholder cannot be base64 (53 characters): no MP3 size is made up.
    placeholder = original["data"]["full_audio"]
    summary = {
        "dropped": True,
        "base64_length": len(placeholder),
        "base64_sha256": hashlib.sha256(placeholder.encode()).hexdigest(),
        "mp3_bytes": None,
    }
    assert stored == {**original, "data": {**original["data"], "full_audio": summary}}
    assert event.key == "elevenlabs:post_call_audio:1739537319:abc"
    assert (event.messages, event.call.status) == ([], None)


def test_real_audio_is_replaced_by_its_size_and_hash() -> None:
    mp3 = bytes(range(256)) * 40_000  # 10 MB
    encoded = base64.b64encode(mp3).decode()
    event, _ = parse_event(audio_body(encoded, has_audio=True))
    stored = json.loads(event.stored_body)
    assert stored["data"]["full_audio"] == {
        "dropped": True,
        "base64_length": len(encoded),
        "base64_sha256": hashlib.sha256(encoded.encode()).hexdigest(),
        "mp3_bytes": len(mp3),
    }
    assert stored["data"]["has_audio"] is True  # every other field is kept
    assert len(event.stored_body) < 400
    # A sender that escapes "/" as "\/" sends the same audio.
    escaped = audio_body(encoded).replace(b"/", b"\\/")
    assert escaped != audio_body(encoded)
    assert json.loads(parse_event(escaped)[0].stored_body)["data"]["full_audio"] == stored["data"]["full_audio"]
    # Padding is taken off the size: one and two "=".
    for size in (1, 2, 3):
        short = json.loads(parse_event(audio_body(base64.b64encode(mp3[:size]).decode()))[0].stored_body)
        assert short["data"]["full_audio"]["mp3_bytes"] == size


def test_keep_audio_keeps_the_body_as_received() -> None:
    body = audio_body(base64.b64encode(b"ID3 mp3").decode())
    event, _ = parse_event(body, keep_audio=True)
    assert event.stored_body == body


def test_a_stored_audio_event_parses_again_unchanged() -> None:
    # Replay reads what the event log kept: it must map to the same event, and not be stripped twice.
    first, _ = parse_event(audio_body(base64.b64encode(b"ID3 mp3").decode()))
    again, problems = parse_event(first.stored_body)
    assert problems == []
    assert (again.stored_body, again.key, again.conversation_id) == (
        first.stored_body,
        first.key,
        first.conversation_id,
    )
    for audio in (None, 42):
        body = audio_body(audio)  # type: ignore[arg-type]
        assert parse_event(body)[0].stored_body == body


def test_unknown_types_are_kept_raw() -> None:
    body = body_of({"type": "post_call_something_new", "event_timestamp": 7, "data": {"conversation_id": "c9"}})
    event, problems = parse_event(body)
    assert problems == []
    assert (event.event_type, event.conversation_id, event.stored_body) == ("post_call_something_new", "c9", body)
    assert (event.messages, event.call.status) == ([], None)
    workspace = body_of({"type": "voice_removal_notice", "event_timestamp": 7, "data": {"voice_id": "v"}})
    event, problems = parse_event(workspace)
    assert (event.conversation_id, problems) == ("elevenlabs:voice_removal_notice", [])
    odd = body_of({"type": "x", "data": [1, 2]})
    assert parse_event(odd)[0].conversation_id == "elevenlabs:x"


def test_the_key_is_type_timestamp_and_conversation() -> None:
    base = {
        "type": "post_call_transcription",
        "event_timestamp": 100,
        "data": {"conversation_id": "c", "transcript": []},
    }
    key = parse_event(body_of(base))[0].key
    assert key == "elevenlabs:post_call_transcription:100:c"
    # The same event re-sent with other formatting is the same delivery.
    assert parse_event(json.dumps(base, indent=4).encode())[0].key == key
    assert parse_event(body_of({**base, "event_timestamp": 101}))[0].key != key
    assert parse_event(body_of({**base, "type": "post_call_audio"}))[0].key != key
    # Without a timestamp, only the very same bytes are the same delivery.
    no_stamp = {k: v for k, v in base.items() if k != "event_timestamp"}
    hashed = parse_event(body_of(no_stamp))[0].key
    assert hashed.startswith("elevenlabs:sha256:")
    assert parse_event(body_of(no_stamp))[0].key == hashed
    assert parse_event(json.dumps(no_stamp, indent=1).encode())[0].key != hashed


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        (b"not json", MalformedJSON, None),
        (b'{"data": {}}', InvalidPayload, "$"),  # msgspec names a missing field at its object
        (b'{"type": "", "data": {}}', InvalidPayload, "$.type"),
        (b'{"type": "post_call_transcription", "data": {"transcript": []}}', InvalidPayload, "$.data.conversation_id"),
        (b'{"type": "post_call_audio", "data": {"conversation_id": ""}}', InvalidPayload, "$.data.conversation_id"),
        (
            b'{"type": "call_initiation_failure", "data": {"conversation_id": 5}}',
            InvalidPayload,
            "$.data.conversation_id",
        ),
    ],
)
def test_what_cannot_be_stored_at_all(body: bytes, error: type[Exception], field: str | None) -> None:
    with pytest.raises(error) as caught:
        parse_event(body)
    if field is not None:
        assert isinstance(caught.value, InvalidPayload)
        assert caught.value.problems[0].field == field


def test_bad_turns_are_named_and_the_others_kept_in_their_places() -> None:
    turns: list[Any] = [
        {"role": "agent", "message": "one", "time_in_call_secs": 0},
        {"role": 5, "message": "bad role type"},
        {"role": "narrator", "message": "unknown role"},
        "not an object",
        {"role": "user", "message": "four", "time_in_call_secs": 4},
    ]
    event, problems = parse_event(transcription(turns))
    assert sorted(str(p.field) for p in problems) == [
        "$.data.transcript[1].role",
        "$.data.transcript[2].role",
        "$.data.transcript[3]",
    ]
    assert event.rejected == 3
    assert [(m.seq, m.content, m.timestamp) for m in event.messages] == [
        (0, "one", 1_760_000_000),
        (4, "four", 1_760_000_004),
    ]
    assert event.call.status == "ended"


def test_bad_metadata_or_analysis_costs_no_message() -> None:
    turns = [{"role": "user", "message": "hi", "time_in_call_secs": 1}]
    event, problems = parse_event(transcription(turns, metadata={"start_time_unix_secs": "soon"}))
    assert [p.field for p in problems] == ["$.data.metadata.start_time_unix_secs"]
    assert [m.content for m in event.messages] == ["hi"]
    assert event.messages[0].timestamp is None
    event, problems = parse_event(transcription(turns, status="failed"))
    assert (problems, event.call.status) == ([], "failed")
    event, problems = parse_event(transcription(turns, analysis=None))
    assert (problems, event.call.analysis) == ([], None)


def test_a_transcript_that_is_not_a_list_is_named() -> None:
    event, problems = parse_event(transcription({"role": "user"}))  # type: ignore[arg-type]
    assert [p.field for p in problems] == ["$.data.transcript"]
    assert event.messages == []


# Arbitrary transcripts: every turn's text, call and result comes back, in order, with its role.

texts = st.text(max_size=40) | st.sampled_from(["", "ünïcødé ✓", "x" * 5000, "\u2028\x00"])
tool_objects = st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=10), max_size=3)
turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "agent"]), "message": st.none() | texts},
    optional={
        "time_in_call_secs": st.integers(min_value=0, max_value=10_000),
        "tool_calls": st.none() | st.lists(tool_objects, max_size=2),
        "tool_results": st.none() | st.lists(tool_objects, max_size=2),
        "interrupted": st.booleans(),
    },
)


def expected_messages(turns: list[dict[str, Any]], start: int) -> list[tuple[str, str, Any, Any]]:
    out: list[tuple[str, str, Any, Any]] = []
    for t in turns:
        role = {"user": "user", "agent": "assistant"}[t["role"]]
        offset = t.get("time_in_call_secs")
        at = None if offset is None else start + offset
        tools = (t.get("tool_calls") or []) + (t.get("tool_results") or [])
        if t["message"] or not tools:
            out.append((role, t["message"] or "", at, offset))
        out.extend(("tool", tool, at, offset) for tool in tools)
    return out


@settings(max_examples=150, deadline=None)
@given(turns=st.lists(turn, max_size=12), start=st.integers(min_value=0, max_value=2_000_000_000))
def test_any_transcript_maps_to_its_messages_in_order(turns: list[dict[str, Any]], start: int) -> None:
    event, problems = parse_event(transcription(turns, at=start))
    assert problems == []
    got = [
        (m.role, json.loads(m.content) if m.role == "tool" else m.content, m.timestamp, m.seconds_from_start)
        for m in event.messages
    ]
    assert got == expected_messages(turns, start)
    assert [m.seq for m in event.messages] == list(range(len(event.messages)))
    assert all(isinstance(m, Message) for m in event.messages)
    # The same body again maps to the same rows: a re-delivery changes nothing.
    assert parse_event(transcription(turns, at=start))[0].messages == event.messages


@settings(max_examples=50, deadline=None)
@given(
    audio=st.binary(max_size=3000), extra=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=3)
)
def test_any_audio_is_summarised_and_every_other_field_kept(audio: bytes, extra: dict[str, int]) -> None:
    extra.pop("full_audio", None)
    extra.pop("conversation_id", None)
    event, _ = parse_event(audio_body(base64.b64encode(audio).decode(), **extra))
    stored = msgspec.json.decode(event.stored_body)
    encoded = base64.b64encode(audio)
    assert stored["data"]["full_audio"]["base64_sha256"] == hashlib.sha256(encoded).hexdigest()
    assert stored["data"]["full_audio"]["mp3_bytes"] == len(audio)
    assert {k: stored["data"][k] for k in extra} == extra


def test_only_bad_turns_count_as_rejected() -> None:
    turns = [{"role": "user", "message": "hi"}, {"role": "robot", "message": "?"}]
    event, problems = parse_event(transcription(turns, metadata={"start_time_unix_secs": "soon"}))
    assert len(problems) == 2
    assert event.rejected == 1


def test_the_stored_audio_event_is_the_body_as_received_but_the_audio() -> None:
    encoded = base64.b64encode(bytes(range(256)) * 100).decode()
    payload = {"type": "post_call_audio", "event_timestamp": 9, "data": {"conversation_id": "c", "full_audio": encoded}}
    body = json.dumps(payload, indent=3).encode()
    event, _ = parse_event(body)
    summary = json.loads(event.stored_body)["data"]["full_audio"]
    assert event.stored_body == body.replace(f'"{encoded}"'.encode(), msgspec.json.encode(summary))


def test_a_copy_of_the_audio_text_elsewhere_is_not_taken_for_it() -> None:
    # Crafted: the same text under another key, first. data.full_audio is still the one replaced.
    encoded = base64.b64encode(b"ID3" * 400).decode()
    data = {"conversation_id": "c", "full_audio": encoded}
    body = json.dumps({"type": "post_call_audio", "copy": encoded, "event_timestamp": 9, "data": data}).encode()
    stored = json.loads(parse_event(body)[0].stored_body)
    assert stored["data"]["full_audio"]["base64_sha256"] == hashlib.sha256(encoded.encode()).hexdigest()
    assert stored["copy"] == encoded
