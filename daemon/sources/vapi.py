"""Vapi server messages (``POST /webhooks/vapi``): msgspec models, and their mapping to a delivery.

Every message is ``{"message": {"type", "call": {"id", ...}, "timestamp", ...}}``. Three types change a
conversation: ``end-of-call-report`` (the transcript at ``artifact.messages``, the analysis, the ended
reason, start and end times, the recording), ``status-update`` and ``conversation-update`` (the history
so far, a full snapshot each time). Any other type is stored raw and answered 2xx.

Vapi sends a message once (no retries unless the customer sets a ``backoffPlan``) and its bodies carry
presigned URLs that change on every delivery: the idempotency key is the call id and the message type
(with the status, or the snapshot's timestamp), never a hash of the body.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import msgspec

from daemon.decoding import decode, decode_items, epoch_seconds
from daemon.errors import InvalidPayload, Problem
from daemon.sources.model import ConversationId, EventType, NormalRole, Role, Source, replay_with
from daemon.sources.vapi_auth import VapiSettings, authenticate
from storage.deliveries import NULL, Delivery, MessageRow

NAME = "vapi"
END_OF_CALL = "end-of-call-report"
STATUS_UPDATE = "status-update"
CONVERSATION_UPDATE = "conversation-update"
EVENTS = frozenset({END_OF_CALL, STATUS_UPDATE, CONVERSATION_UPDATE})

# Vapi's roles (BotMessage, UserMessage, SystemMessage, ToolCallMessage, ToolCallResultMessage in its
# OpenAPI schema; its docs' examples also write "assistant") and the normalised role of each.
ROLES: dict[str, NormalRole] = {
    "system": "system",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "tool_calls": "tool",
    "tool_call_result": "tool",
    "tool": "tool",
}


def _absent() -> msgspec.Raw:
    # msgspec.Raw takes any JSON value but cannot share a union with None: absent is JSON null.
    return msgspec.Raw(b"null")


def _given(raw: msgspec.Raw) -> msgspec.Raw | None:
    """A raw field's value, or None if it was left out or null."""
    return None if bytes(raw) == b"null" else raw


class CallRef(msgspec.Struct, frozen=True):
    id: ConversationId | None = None


class Mono(msgspec.Struct, frozen=True, rename="camel"):
    combined_url: str | None = None


class Recording(msgspec.Struct, frozen=True, rename="camel"):
    mono: Mono | None = None
    stereo_url: str | None = None


class Artifact(msgspec.Struct, frozen=True, rename="camel"):
    """``artifact``: what the call left behind. Presigned URLs are not read: they expire."""

    messages: msgspec.Raw = msgspec.field(default_factory=_absent)
    recording_url: str | None = None
    stereo_recording_url: str | None = None
    recording: Recording | None = None


class ServerMessage(msgspec.Struct, frozen=True, rename="camel"):
    """The ``message`` of a Vapi server message; fields other types carry are ignored."""

    type: EventType
    call: CallRef | None = None
    chat: CallRef | None = None  # a chat's messages carry the chat instead of a call
    timestamp: float | None = None  # Unix milliseconds
    status: str | None = None
    ended_reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: msgspec.Raw = msgspec.field(default_factory=_absent)
    artifact: Artifact | None = None
    messages: msgspec.Raw = msgspec.field(default_factory=_absent)  # conversation-update: the history so far
    recording_url: str | None = None  # deprecated, in favour of artifact.recordingUrl


class Envelope(msgspec.Struct, frozen=True):
    """A Vapi server message, as POSTed to the server URL."""

    message: ServerMessage


class _BareMessage(msgspec.Struct, frozen=True):
    type: EventType
    call: CallRef | None = None
    chat: CallRef | None = None


class _BareEnvelope(msgspec.Struct, frozen=True):
    """The least a message must hold to be stored: when a field of ``Envelope`` is of the wrong type."""

    message: _BareMessage


class VapiMessage(msgspec.Struct, frozen=True, rename="camel", gc=False):
    """One entry of ``artifact.messages`` (or of a snapshot's ``messages``)."""

    role: Role
    message: str | None = None
    time: float | None = None  # Unix milliseconds
    seconds_from_start: float | None = None
    duration: float | None = None  # stored as sent: Vapi's schema says seconds, its examples send ms
    tool_calls: msgspec.Raw = msgspec.field(default_factory=_absent)
    tool_call_id: str | None = None
    name: str | None = None
    result: msgspec.Raw = msgspec.field(default_factory=_absent)


class _ToolResult(msgspec.Struct, rename="camel"):
    tool_call_id: str | None
    name: str | None
    result: msgspec.Raw


def parse(body: bytes, headers: Mapping[str, str], *, received_at: float) -> tuple[Delivery, list[Problem]]:
    """Map one server message to a delivery, and list what is wrong with it.

    Only a body that is not JSON, or a message without a type and a call (or chat) id, raises: nothing
    can be stored. Past that, the raw message is always stored and every good transcript entry kept.
    """
    try:
        message = decode(body, Envelope).message
    except InvalidPayload as exc:
        bare = decode(body, _BareEnvelope).message  # raises if even the least is not there
        key = f"{bare.type}:malformed:{received_at!r}"
        delivery = _delivery(body, bare.type, _conversation_id(bare), received_at, key)
        return delivery, exc.problems
    cid = _conversation_id(message)
    stamp = _seconds(message.timestamp)
    match message.type:
        case "end-of-call-report":
            delivery = _delivery(body, message.type, cid, received_at, END_OF_CALL)
            problems = _end_of_call(delivery, message, stamp)
        case "status-update":
            delivery = _delivery(body, message.type, cid, received_at, f"{STATUS_UPDATE}:{message.status}")
            problems = _status_update(delivery, message, stamp)
        case "conversation-update":
            # A snapshot each time: its rows update the positions an earlier one wrote.
            when = repr(message.timestamp) if message.timestamp is not None else f"received:{received_at!r}"
            delivery = _delivery(body, message.type, cid, received_at, f"{CONVERSATION_UPDATE}:{when}")
            snapshot = _given(message.messages)
            raw = snapshot if snapshot is not None else _artifact_messages(message)
            path = "$.message.messages" if snapshot is not None else "$.message.artifact.messages"
            problems = _add_messages(delivery, raw, path)
        case _:
            # Stored raw, answered 2xx. Its own time tells two messages of one type apart.
            when = repr(message.timestamp) if message.timestamp is not None else f"received:{received_at!r}"
            delivery = _delivery(body, message.type, cid, received_at, f"{message.type}:{when}")
            problems = []
    return delivery, problems


def _conversation_id(message: ServerMessage | _BareMessage) -> str:
    for ref in (message.call, message.chat):
        if ref is not None and ref.id is not None:
            return ref.id
    raise InvalidPayload([Problem("a Vapi message needs message.call.id", "$.message.call.id")])


def _delivery(body: bytes, event_type: str, cid: str, received_at: float, key: str) -> Delivery:
    return Delivery(
        key=f"{NAME}:{cid}:{key}",
        source=NAME,
        event_type=event_type,
        conversation_id=cid,
        received_at=received_at,
        body=body,
    )


def _end_of_call(delivery: Delivery, message: ServerMessage, stamp: float | None) -> list[Problem]:
    patch = delivery.patch
    patch.status = "ended"
    patch.started_at = epoch_seconds(message.started_at)
    patch.ended_at = epoch_seconds(message.ended_at) or stamp
    patch.end_reason = message.ended_reason
    patch.recording_uri = _recording_url(message)
    analysis = bytes(message.analysis)
    if analysis.strip() not in (b"null", b"{}"):
        patch.analysis = analysis.decode()
    return _add_messages(delivery, _artifact_messages(message), "$.message.artifact.messages")


def _status_update(delivery: Delivery, message: ServerMessage, stamp: float | None) -> list[Problem]:
    patch = delivery.patch
    if message.status == "in-progress":
        patch.started_at = stamp
    elif message.status == "ended":
        patch.status, patch.ended_at, patch.end_reason = "ended", stamp, message.ended_reason
    return []


def _artifact_messages(message: ServerMessage) -> msgspec.Raw | None:
    return _given(message.artifact.messages) if message.artifact is not None else None


def _recording_url(message: ServerMessage) -> str | None:
    artifact = message.artifact
    if artifact is None:
        return message.recording_url
    recording = artifact.recording
    mono = recording.mono.combined_url if recording is not None and recording.mono is not None else None
    stereo = recording.stereo_url if recording is not None else None
    return artifact.recording_url or mono or message.recording_url or artifact.stereo_recording_url or stereo


def _add_messages(delivery: Delivery, raw: msgspec.Raw | None, path: str) -> list[Problem]:
    if raw is None:
        return []
    try:
        items = decode(raw, list[msgspec.Raw], path=path)
    except InvalidPayload as exc:
        return exc.problems
    good, problems = decode_items(items, VapiMessage, path=path)
    known = []
    for index, entry in good:
        if entry.role in ROLES:
            known.append((index, entry))
        else:
            problems.append(
                Problem(f"unknown role {entry.role!r} (known: {', '.join(ROLES)})", f"{path}[{index}].role")
            )
    delivery.rejected = len(problems)
    delivery.rows = _rows(delivery, known)
    if delivery.rows:
        # NaN is the one value not equal to itself.
        stamps = [at for row in delivery.rows if (at := row[5]) == at]
        delivery.last_message_at = max(stamps) if stamps else delivery.received_at  # type: ignore[type-var]
    return problems


def _rows(delivery: Delivery, entries: Iterable[tuple[int, VapiMessage]]) -> list[MessageRow]:
    cid, now = delivery.conversation_id, delivery.received_at
    # NULL (NaN) rather than None: the writer binds these rows in bulk (see storage.deliveries.NULL).
    return [
        (
            cid,
            NAME,
            seq,
            (role := ROLES[entry.role]),
            _content(entry),
            NULL if (at := _seconds(entry.time)) is None else at,
            NULL if (offset := entry.seconds_from_start) is None else offset,
            NULL if (duration := entry.duration) is None else duration,
            NULL,
            NULL if entry.role == role else entry.role,
            NULL,
            now,
        )
        for seq, entry in entries
    ]


def _content(entry: VapiMessage) -> str:
    """What was said; for a tool call, the calls as JSON; for a tool's result, the result as JSON."""
    if entry.role == "tool_calls" and _given(entry.tool_calls) is not None:
        return bytes(entry.tool_calls).decode()
    if entry.role == "tool_call_result":
        return msgspec.json.encode(_ToolResult(entry.tool_call_id, entry.name, entry.result)).decode()
    return entry.message or ""


def _seconds(value: float | None) -> float | None:
    """Unix seconds from Vapi's epoch milliseconds (``time``, ``timestamp``)."""
    if value is None or not math.isfinite(value):
        return None
    return value / 1000


SOURCE = Source(
    name=NAME,
    title="A Vapi server message (end-of-call-report, status-update, conversation-update, ...)",
    parse=parse,
    replay=replay_with(parse),
    events=EVENTS,
    body=Envelope,
    settings=VapiSettings,
    authenticate=authenticate,
)
