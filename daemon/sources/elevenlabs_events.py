"""ElevenLabs Agents post-call webhooks: msgspec models of the bodies, and their mapping to normalised
messages and conversation fields, as pure functions of the body.

Body: ``{"type", "event_timestamp", "data"}``. ``post_call_transcription`` carries the whole transcript at
``data.transcript[]`` (``role`` user/agent, ``message`` nullable, ``time_in_call_secs``, ``tool_calls[]``,
``tool_results[]``), ``data.metadata`` and ``data.analysis``; ``post_call_audio`` the call's MP3, base64, in
``data.full_audio`` (tens of megabytes, sent chunked); ``call_initiation_failure`` a call that never started,
with ``data.failure_reason``. Any other type is kept raw. ElevenLabs documents de-duplication on
``event_timestamp`` + ``conversation_id``: with the type, that is the delivery key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from daemon.decoding import body_key, decode, decode_items
from daemon.errors import InvalidPayload, Problem
from daemon.sources.model import ConversationId, EventType, Message, NormalRole, Role

NAME = "elevenlabs"
TRANSCRIPTION = "post_call_transcription"
AUDIO = "post_call_audio"
FAILURE = "call_initiation_failure"
EVENT_TYPES = (TRANSCRIPTION, AUDIO, FAILURE)
# The normalised role of each vendor role; tool calls and results become "tool" messages.
ROLES: dict[str, NormalRole] = {"user": "user", "agent": "assistant"}

Status = Literal["ended", "failed"]


class Envelope(msgspec.Struct, frozen=True):
    """An ElevenLabs webhook body. ``event_timestamp`` is kept as sent (its JSON text is part of the key)."""

    type: EventType
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    event_timestamp: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class Ids(msgspec.Struct, frozen=True):
    """What every event's ``data`` is expected to name; workspace events (not per call) have no id."""

    conversation_id: ConversationId | None = None


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One transcript turn. Other fields (``interrupted``, ``original_message``, metrics, ...) stay in the raw event."""

    role: Role
    message: str | None = None
    time_in_call_secs: float | None = None
    tool_calls: list[msgspec.Raw] | None = None
    tool_results: list[msgspec.Raw] | None = None


class Metadata(msgspec.Struct, frozen=True):
    start_time_unix_secs: float | None = None
    call_duration_secs: float | None = None
    termination_reason: str | None = None


class Transcription(msgspec.Struct, frozen=True):
    conversation_id: ConversationId
    transcript: list[Entry]
    status: str | None = None
    metadata: Metadata | None = None
    analysis: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class RawTranscription(msgspec.Struct, frozen=True):
    """The slow path, when something is wrong: every turn kept as raw JSON and checked alone."""

    conversation_id: ConversationId
    transcript: list[msgspec.Raw]


class Audio(msgspec.Struct, frozen=True):
    conversation_id: ConversationId
    # Raw: tens of megabytes of base64 are neither copied into a str nor kept, unless the setting says so.
    full_audio: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class Failure(msgspec.Struct, frozen=True):
    conversation_id: ConversationId
    failure_reason: str | None = None


@dataclass(slots=True)
class CallFields:
    """What an event says about its conversation; None leaves a field as it is."""

    status: Status | None = None
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    analysis: str | None = None  # data.analysis as JSON


@dataclass(slots=True)
class Event:
    """A body mapped: its key, what the raw event log keeps of it, its messages and its conversation fields."""

    event_type: str
    conversation_id: str
    key: str
    stored_body: bytes
    messages: list[Message] = field(default_factory=list)
    call: CallFields = field(default_factory=CallFields)
    rejected: int = 0


def parse_event(body: bytes, *, keep_audio: bool = False) -> tuple[Event, list[Problem]]:
    """Map one webhook body, and list what is wrong with it.

    Only a body that is not JSON, or one without a usable ``type`` (and, for the three known types,
    ``data.conversation_id``), raises: nothing can be stored. Past that, the event is always kept, and a
    transcript with bad turns still yields every good one.
    """
    envelope = decode(body, Envelope)
    kind = envelope.type
    if kind not in EVENT_TYPES:
        return _unknown(envelope, body), []
    if kind == AUDIO:  # one pass over tens of megabytes, not two
        audio = decode(envelope.data, Audio, path="$.data")
        event = Event(kind, audio.conversation_id, _key(envelope, audio.conversation_id, body), body)
        if not keep_audio:
            _drop_audio(event, audio.full_audio, escaped=b"\\" in body)
        return event, []
    ids = decode(envelope.data, Ids, path="$.data")
    if ids.conversation_id is None:
        raise InvalidPayload([Problem("Object missing required field `conversation_id`", "$.data.conversation_id")])
    event = Event(kind, ids.conversation_id, _key(envelope, ids.conversation_id, body), body)
    if kind == FAILURE:
        return event, _failure(event, envelope)
    return event, _transcription(event, envelope.data)


def _key(envelope: Envelope, conversation_id: str, body: bytes) -> str:
    """type + event_timestamp + conversation_id, as ElevenLabs documents; a body hash without a timestamp."""
    stamp = bytes(envelope.event_timestamp).strip()
    if stamp in (b"", b"null") or len(stamp) > 64:
        return body_key(NAME, body, conversation_id)
    return f"{NAME}:{envelope.type}:{stamp.decode('utf-8', 'replace')}:{conversation_id}"


def _unknown(envelope: Envelope, body: bytes) -> Event:
    """Kept raw, answered 200. An event of no call (workspace events) is kept under ``elevenlabs:<type>``."""
    try:
        conversation_id = decode(envelope.data, Ids, path="$.data").conversation_id
    except InvalidPayload:
        conversation_id = None
    cid = conversation_id or f"{NAME}:{envelope.type}"[:256]
    return Event(envelope.type, cid, _key(envelope, cid, body), body)


def _failure(event: Event, envelope: Envelope) -> list[Problem]:
    try:
        failure = decode(envelope.data, Failure, path="$.data")
    except InvalidPayload as exc:
        return exc.problems
    event.call.status = "failed"
    event.call.end_reason = failure.failure_reason or "call initiation failed"
    event.call.ended_at = _number(envelope.event_timestamp)
    return []


def _transcription(event: Event, data: msgspec.Raw) -> list[Problem]:
    try:
        call = decode(data, Transcription, path="$.data")
    except InvalidPayload as exc:
        # The envelope is sound: the raw event is stored, and every turn that decodes is kept.
        return _transcription_leniently(event, data, exc.problems)
    fields = event.call
    fields.status = "failed" if call.status == "failed" else "ended"
    meta = call.metadata or Metadata()
    start = meta.start_time_unix_secs
    fields.started_at = start
    if start is not None and meta.call_duration_secs is not None:
        fields.ended_at = start + meta.call_duration_secs
    fields.end_reason = meta.termination_reason or None  # the docs' example sends ""
    if bytes(call.analysis).strip() != b"null":
        fields.analysis = _compact(call.analysis)
    problems: list[Problem] = []
    event.messages = messages(enumerate(call.transcript), start, problems)
    event.rejected = len(problems)
    return problems


def _transcription_leniently(event: Event, data: msgspec.Raw, problems: list[Problem]) -> list[Problem]:
    try:
        raw = decode(data, RawTranscription, path="$.data")
    except InvalidPayload:
        return problems
    good, problems = decode_items(raw.transcript, Entry, path="$.data.transcript")
    start = None
    try:
        call = decode(data, _Timing, path="$.data")
        start = call.metadata.start_time_unix_secs if call.metadata else None
    except InvalidPayload as exc:
        problems.extend(exc.problems)
    event.call.status = "ended"
    event.messages = messages(good, start, problems)
    event.rejected = sum((p.field or "").startswith("$.data.transcript[") for p in problems)  # turns, not other fields
    return problems


class _Timing(msgspec.Struct, frozen=True):
    metadata: Metadata | None = None


def messages(entries: Iterable[tuple[int, Entry]], start: float | None, problems: list[Problem]) -> list[Message]:
    """The normalised messages of ``(index, Entry)`` pairs, in transcript order.

    A turn becomes its text (if it has any, or if it has nothing else), then one ``tool`` message per tool
    call, then one per tool result, each the call or result as JSON. A turn that did not decode (absent
    from ``entries``) or has an unknown role still takes one position, so the positions of the others do
    not depend on it: a re-delivery after a fix updates rows instead of shifting them.
    """
    out: list[Message] = []
    seq = 0
    previous = -1
    for index, entry in entries:
        seq += index - previous - 1  # turns left out (bad ones) keep their place
        previous = index
        role = ROLES.get(entry.role)
        if role is None:
            where = f"$.data.transcript[{index}].role"
            problems.append(Problem(f"unknown role {entry.role!r}: expected user or agent", where))
            seq += 1
            continue
        offset = entry.time_in_call_secs
        at = start + offset if start is not None and offset is not None else None
        calls, results = entry.tool_calls or [], entry.tool_results or []
        if entry.message or not (calls or results):
            out.append(Message(seq, role, entry.role, entry.message or "", timestamp=at, seconds_from_start=offset))
            seq += 1
        for raw in (*calls, *results):
            out.append(Message(seq, "tool", entry.role, _compact(raw), timestamp=at, seconds_from_start=offset))
            seq += 1
    return out


def _compact(raw: msgspec.Raw) -> str:
    """JSON text without the sender's whitespace (key order kept), so the content reads the same however it was sent."""
    return msgspec.json.encode(msgspec.json.decode(raw)).decode()


def _number(raw: msgspec.Raw) -> float | None:
    try:
        value = msgspec.json.decode(raw, type=float | None, strict=False)
    except msgspec.ValidationError:
        return None
    return value


def _drop_audio(event: Event, full_audio: msgspec.Raw, *, escaped: bool) -> None:
    """The raw event keeps the envelope with ``data.full_audio`` replaced by :func:`audio_summary`. Only a
    string is audio: a body already stripped (replayed from the event log) is left as it is."""
    if bytes(memoryview(full_audio)[:1]) == b'"':
        summary = audio_summary(full_audio, escaped=escaped)
        event.stored_body = _spliced(event.stored_body, full_audio, summary) or _without_audio(
            event.stored_body, summary
        )


def audio_summary(full_audio: msgspec.Raw, *, escaped: bool = True) -> dict[str, object]:
    """What is kept of ``full_audio``: the length and SHA-256 of its base64 text (``base64 -w0 call.mp3 |
    sha256sum`` gives the same), and the MP3's size that text decodes to (None if it cannot be base64, as
    the docs' placeholder). The text is hashed, not decoded: Python decodes base64 at ~200 MB/s, and a
    40 MB body would hold the event loop for a fifth of a second more."""
    view = memoryview(full_audio)  # msgspec's Raw spans exactly the JSON string, quotes included: no copy
    inner: bytes | memoryview = view[1:-1]
    # ``escaped`` is False when the whole body has no backslash: the common case, checked without a copy.
    if escaped and b"\\" in view.tobytes():  # a sender may write "\/": unescape it (rare, so a copy is fine)
        inner = msgspec.json.decode(view, type=str).encode()
    length = len(inner)
    padding = bytes(inner[-2:]).count(b"=") if length >= 2 else 0
    mp3_bytes = length // 4 * 3 - padding if length % 4 == 0 else None
    return {
        "dropped": True,
        "base64_length": length,
        "base64_sha256": hashlib.sha256(inner).hexdigest(),
        "mp3_bytes": mp3_bytes,
    }


def _spliced(body: bytes, full_audio: msgspec.Raw, summary: dict[str, object]) -> bytes | None:
    """The body with the audio's JSON text replaced by ``summary``'s, every other byte as received; None if
    that cannot be told apart from another copy of the same text. The audio's place is found by its first
    bytes, and checked with one memcmp (``startswith``; comparing memoryviews goes byte by byte, 6x
    slower): two fewer passes over tens of megabytes than :func:`_without_audio`."""
    audio = memoryview(full_audio)
    at = body.find(audio[:256])
    if at < 0 or not body.startswith(audio, at):
        return None
    spliced = body[:at] + msgspec.json.encode(summary) + body[at + len(audio) :]
    # The same text elsewhere in the body (a crafted one) would have been replaced instead: check.
    kept = msgspec.json.decode(msgspec.json.decode(spliced, type=dict[str, msgspec.Raw])["data"], type=_Kept)
    return spliced if kept.full_audio == summary else None


class _Kept(msgspec.Struct):
    full_audio: object = None


def _without_audio(body: bytes, summary: dict[str, object]) -> bytes:
    """The body re-encoded with ``data.full_audio`` replaced by ``summary``. Every other value is
    written back as the exact JSON text received (``msgspec.Raw``); only whitespace between keys changes."""
    top = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    data = msgspec.json.decode(top["data"], type=dict[str, msgspec.Raw])
    data["full_audio"] = msgspec.Raw(msgspec.json.encode(summary))
    top["data"] = msgspec.Raw(msgspec.json.encode(data))
    return msgspec.json.encode(top)
