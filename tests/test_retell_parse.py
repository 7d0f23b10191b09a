"""Retell bodies to normalised messages and call fields: the docs' examples, every entry kind, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import InvalidPayload, MalformedJSON
from daemon.sources.model import Message
from daemon.sources.retell import ROLES, parse_call

FIXTURES = Path(__file__).parent / "fixtures" / "retell"
CALL_ID = "Jabr9TXYYJHfvl6Syypi88rdAHYHmcq6"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def body(event: str, call: dict[str, Any], *, key: str = "call") -> bytes:
    return json.dumps({"event": event, key: call}).encode()


def utterance(role: str, content: str, *words: tuple[float, float]) -> dict[str, Any]:
    return {"role": role, "content": content, "words": [{"word": "w", "start": s, "end": e} for s, e in words]}


def test_the_call_ended_fixture_is_the_docs_sample_with_its_placeholders_filled() -> None:
    # The webhook overview's sample elides both transcripts as "[ [Object], ... ]": the fixture fills them
    # with the first four utterances of the custom-function page's example call, and changes nothing else.
    sample = (FIXTURES / "webhook_overview_call_ended.txt").read_text(encoding="utf-8")
    placeholder = "[ [Object], [Object], [Object], [Object] ]"
    utterances = fixture("custom_function_request.json")["call"]["transcript_object"][:4]
    assert json.loads(sample.replace(placeholder, json.dumps(utterances))) == fixture("call_ended.json")


def test_the_docs_call_ended_sample() -> None:
    parsed = parse_call((FIXTURES / "call_ended.json").read_bytes())
    assert (parsed.event, parsed.call_id, parsed.key) == ("call_ended", CALL_ID, f"retell:call_ended:{CALL_ID}")
    assert parsed.problems == []
    assert [(m.seq, m.role, m.vendor_role, m.content) for m in parsed.messages] == [
        (0, "assistant", "agent", "Hi John, thanks for calling! How can I help you today?"),
        (1, "user", "user", "Hi, I'd like to check the status of my recent order."),
        (2, "assistant", "agent", "Sure, I'd be happy to help with that. Could you provide me your order number?"),
        (3, "user", "user", "Yes, it's 78542."),
    ]
    # From the first word's start to the last word's end.
    assert [(m.seconds_from_start, m.duration) for m in parsed.messages] == [
        (0.5, 2.8),
        (4.0, 2.6),
        (7.0, 3.6),
        (11.5, 1.4),
    ]
    fields = parsed.fields
    assert fields.status == "ended"
    assert (fields.started_at, fields.ended_at) == (1714608475.945, 1714608491.736)
    assert fields.end_reason == "user_hangup"
    assert (fields.recording_url, fields.analysis) == (None, None)


def test_the_api_references_call_object_as_call_analyzed() -> None:
    parsed = parse_call(body("call_analyzed", fixture("api_reference_call.json")))
    assert parsed.key == f"retell:call_analyzed:{CALL_ID}"
    assert parsed.messages == [
        Message(0, "assistant", "agent", "hi how are you doing?", seconds_from_start=0.7, duration=0.6)
    ]
    fields = parsed.fields
    assert fields.status == "ended"
    assert fields.end_reason == "agent_hangup"
    assert fields.recording_url == f"https://retellai.s3.us-west-2.amazonaws.com/{CALL_ID}/recording.wav"
    assert fields.analysis is not None
    assert json.loads(fields.analysis) == fixture("api_reference_call.json")["call_analysis"]
    assert json.loads(fields.analysis)["call_successful"] is True


def test_the_custom_function_pages_call_carries_a_tool_call_in_transcript_order() -> None:
    # transcript_with_tool_calls wins over transcript_object when present: it is the one with the tool calls.
    parsed = parse_call(body("transcript_updated", fixture("custom_function_request.json")["call"]))
    assert [(m.role, m.vendor_role) for m in parsed.messages] == [("user", "user"), ("tool", "tool_call_invocation")]
    call = json.loads(parsed.messages[1].content)
    assert call == {
        "tool_call_id": "tool_call_abc123",
        "name": "analyze_transcript",
        "arguments": '{"analysis_type": "sentiment"}',
    }
    # A running snapshot: no status (its last one may arrive after call_ended), started_at known.
    assert parsed.fields.status is None
    assert parsed.fields.started_at == 1703302407.333


def test_every_entry_kind_of_transcript_with_tool_calls() -> None:
    entries: list[dict[str, Any]] = [
        utterance("agent", "Let me check.", (1.0, 1.2), (1.3, 1.9)),
        {"role": "tool_call_invocation", "tool_call_id": "t1", "name": "lookup", "arguments": '{"id": 7}'},
        {"role": "tool_call_result", "tool_call_id": "t1", "content": '{"ok": true}', "successful": True},
        {
            "role": "node_transition",
            "former_node_id": "a",
            "former_node_name": "Greeting",
            "new_node_id": "b",
            "new_node_name": "Lookup",
            "transition_type": "normal",
        },
        {"role": "dtmf", "digit": "#"},
        {"role": "sms", "content": "my order is 42", "time_sec": 12.5},
        {"role": "injected", "content": "VIP customer", "time_sec": 13.0},
        utterance("transfer_target", "Billing, this is Ana.", (20.0, 21.5)),
        {"role": "hologram", "pose": "wave"},
    ]
    parsed = parse_call(body("call_ended", {"call_id": "c-kinds", "transcript_with_tool_calls": entries}))
    assert parsed.problems == []
    got = [(m.seq, m.role, m.vendor_role, m.seconds_from_start, m.duration) for m in parsed.messages]
    assert got == [
        (0, "assistant", "agent", 1.0, 0.9),
        (1, "tool", "tool_call_invocation", None, None),
        (2, "tool", "tool_call_result", None, None),
        (3, "system", "node_transition", None, None),
        (4, "user", "dtmf", None, None),
        (5, "user", "sms", 12.5, None),
        (6, "system", "injected", 13.0, None),
        (7, "user", "transfer_target", 20.0, 1.5),
        (8, "system", "hologram", None, None),
    ]
    contents = [m.content for m in parsed.messages]
    assert contents[0] == "Let me check."
    assert json.loads(contents[1]) == {"tool_call_id": "t1", "name": "lookup", "arguments": '{"id": 7}'}
    assert json.loads(contents[2]) == {"tool_call_id": "t1", "content": '{"ok": true}', "successful": True}
    assert json.loads(contents[3])["new_node_name"] == "Lookup"
    assert "role" not in json.loads(contents[3])
    assert contents[4:8] == ["#", "my order is 42", "VIP customer", "Billing, this is Ana."]
    assert json.loads(contents[8]) == {"pose": "wave"}  # an unknown role: everything it carried


def test_tool_calls_with_time_sec_get_their_offset() -> None:
    entries = [{"role": "tool_call_invocation", "tool_call_id": "t", "name": "n", "arguments": "{}", "time_sec": 9.25}]
    (message,) = parse_call(body("call_ended", {"call_id": "c", "transcript_with_tool_calls": entries})).messages
    assert (message.seconds_from_start, message.duration) == (9.25, None)


@pytest.mark.parametrize(
    ("words", "timing"),
    [
        ([], (None, None)),
        ([{"word": "hi"}], (None, None)),
        ([{"word": "hi", "start": 2.0}], (2.0, None)),
        ([{"word": "hi", "start": 2.0, "end": 1.0}], (2.0, None)),  # an end before the start says nothing
        ([{"word": "a", "start": 3.0, "end": 3.5}, {"word": "b", "start": 3.6}], (3.0, 0.5)),
    ],
)
def test_timing_where_the_words_allow_it(words: list[dict[str, Any]], timing: tuple[Any, Any]) -> None:
    call = {"call_id": "c", "transcript_object": [{"role": "user", "content": "hi", "words": words}]}
    (message,) = parse_call(body("call_ended", call)).messages
    assert (message.seconds_from_start, message.duration) == timing


def test_transcript_object_is_used_when_there_is_no_transcript_with_tool_calls() -> None:
    tool_calls: list[Any] | None
    for tool_calls in (None, []):
        call = {
            "call_id": "c",
            "transcript_object": [utterance("agent", "hello"), utterance("user", "hi")],
            "transcript_with_tool_calls": tool_calls,
        }
        assert [m.content for m in parse_call(body("call_ended", call)).messages] == ["hello", "hi"]


def test_a_bad_entry_costs_that_entry_only_and_is_named() -> None:
    entries: list[Any] = [utterance("agent", "one"), {"content": "no role"}, utterance("user", "three"), 7]
    parsed = parse_call(body("call_ended", {"call_id": "c", "transcript_with_tool_calls": entries}))
    assert [(m.seq, m.content) for m in parsed.messages] == [(0, "one"), (2, "three")]
    assert parsed.rejected == 2
    assert [p.field for p in parsed.problems] == [
        "$.call.transcript_with_tool_calls[1]",
        "$.call.transcript_with_tool_calls[3]",
    ]


def test_a_bad_call_field_costs_that_field_only() -> None:
    call = {
        "call_id": "c",
        "call_status": "ended",
        "start_timestamp": "soon",
        "end_timestamp": 1714608491736,
        "disconnection_reason": 3,
        "transcript_object": [utterance("agent", "kept")],
    }
    parsed = parse_call(body("call_ended", call))
    assert [p.field for p in parsed.problems] == ["$.call.start_timestamp", "$.call.disconnection_reason"]
    assert (parsed.fields.started_at, parsed.fields.ended_at) == (None, 1714608491.736)
    assert [m.content for m in parsed.messages] == ["kept"]


def test_a_transcript_that_is_not_a_list_is_named() -> None:
    parsed = parse_call(body("call_ended", {"call_id": "c", "transcript_object": "Agent: hi"}))
    assert parsed.messages == []
    assert [p.field for p in parsed.problems] == ["$.call.transcript_object"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [("ended", "ended"), ("registered", "ended"), ("not_connected", "failed"), ("error", "failed"), (None, "ended")],
)
def test_end_of_call_status(status: str | None, expected: str) -> None:
    call = {"call_id": "c", "call_status": status, "disconnection_reason": "dial_no_answer"}
    for event in ("call_ended", "call_analyzed"):
        parsed = parse_call(body(event, call))
        assert (parsed.fields.status, parsed.fields.end_reason) == (expected, "dial_no_answer")


def test_call_started_marks_the_call_active() -> None:
    parsed = parse_call(body("call_started", {"call_id": "c", "call_status": "ongoing", "start_timestamp": 1e12}))
    assert (parsed.fields.status, parsed.fields.started_at, parsed.key) == ("active", 1e9, "retell:call_started:c")


def test_the_deprecated_data_key_still_works() -> None:
    parsed = parse_call(
        body("call_ended", {"call_id": "c-old", "transcript_object": [utterance("agent", "hi")]}, key="data")
    )
    assert (parsed.call_id, [m.content for m in parsed.messages]) == ("c-old", ["hi"])


def test_keys_event_and_call_id_except_for_snapshots_and_unknown_events() -> None:
    call = {"call_id": "c", "transcript_object": [utterance("agent", "hi")]}
    longer = {"call_id": "c", "transcript_object": [utterance("agent", "hi"), utterance("user", "yo")]}
    # A retry of call_ended may differ (signed URLs are signed anew): still the same delivery.
    assert parse_call(body("call_ended", call)).key == parse_call(body("call_ended", longer)).key
    assert parse_call(body("call_ended", call)).key != parse_call(body("call_analyzed", call)).key
    # Each snapshot is its own delivery; the same one sent twice is one.
    first, second = parse_call(body("transcript_updated", call)), parse_call(body("transcript_updated", longer))
    assert first.key != second.key
    assert first.key == parse_call(body("transcript_updated", call)).key
    assert parse_call(body("transfer_started", call)).key != parse_call(body("transfer_started", longer)).key


def test_unknown_events_are_kept_raw_without_mapping() -> None:
    parsed = parse_call(body("transfer_bridged", {"call_id": "c-t", "call_status": "ongoing"}))
    assert (parsed.event, parsed.call_id, parsed.messages, parsed.problems) == ("transfer_bridged", "c-t", [], [])
    assert parsed.fields.status is None


def test_a_chat_agents_event_is_kept_under_its_chat_id() -> None:
    parsed = parse_call(json.dumps({"event": "chat_ended", "chat": {"chat_id": "chat-1"}}).encode())
    assert (parsed.call_id, parsed.messages) == ("chat-1", [])


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"call": {"call_id": "c"}}, "$"),
        ({"event": "", "call": {"call_id": "c"}}, "$.event"),
        ({"event": "call_ended"}, "$"),
        ({"event": "call_ended", "call": {}}, "$.call"),
        ({"event": "call_ended", "call": {"call_id": ""}}, "$.call.call_id"),
        ({"event": "call_ended", "call": {"call_id": 12}}, "$.call.call_id"),
        ({"event": "call_ended", "call": ["c"]}, "$.call"),
        ({"event": "chat_ended", "chat": {}}, "$.chat"),
    ],
)
def test_nothing_usable_is_a_422_naming_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_call(json.dumps(payload).encode())
    assert caught.value.field == field


def test_not_json_is_a_400() -> None:
    with pytest.raises(MalformedJSON):
        parse_call(b'{"event": "call_ended", "call": {')


_text = st.text(max_size=80)
_spoken = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["agent", "user", "transfer_target"]),
    _text,
)
_tool = st.builds(
    lambda role, ident, content: {"role": role, "tool_call_id": ident, "content": content, "successful": True},
    st.sampled_from(["tool_call_invocation", "tool_call_result"]),
    _text,
    _text,
)


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.one_of(_spoken, _tool), max_size=30))
def test_any_transcript_maps_in_order_with_exact_content(entries: list[dict[str, Any]]) -> None:
    parsed = parse_call(
        msgspec.json.encode({"event": "call_ended", "call": {"call_id": "c", "transcript_with_tool_calls": entries}})
    )
    assert parsed.problems == []
    assert [m.seq for m in parsed.messages] == list(range(len(entries)))
    for entry, message in zip(entries, parsed.messages, strict=True):
        assert (message.vendor_role, message.role) == (entry["role"], ROLES[entry["role"]])
        if message.role == "tool":
            assert json.loads(message.content) == {k: v for k, v in entry.items() if k != "role"}
        else:
            assert message.content == entry["content"]
