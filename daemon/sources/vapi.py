"""Vapi server messages (``POST /webhooks/vapi``): msgspec models, and their mapping to a delivery's record.

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
from typing import Any, Literal

import msgspec

from daemon.decoding import decode, decode_items, epoch_seconds
from daemon.errors import InvalidPayload, Problem
from daemon.sources import vapi_api
from daemon.sources.model import ConversationId, EventType, NormalRole, Source, replay_with
from daemon.sources.vapi_auth import VapiSettings, authenticate
from storage.deliveries import NO_CHANGE, TIMESTAMP, ConversationPatch, Record, Status, VendorMessageRow, vendor_row

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


# endedReason values (of the ~600 in Vapi's OpenAPI schema) that say the call never connected: such a
# call is 'failed', with its reason, rather than 'ended'.
NOT_CONNECTED_PREFIXES = ("call.start.", "call.ringing.", "call-start-error")
NOT_CONNECTED = frozenset(
    {"customer-busy", "customer-did-not-answer", "twilio-reported-customer-misdialed", "vonage-rejected"}
)


def _status_of(ended_reason: str | None) -> Status:
    if ended_reason is not None and (
        ended_reason in NOT_CONNECTED
        or ended_reason.startswith(NOT_CONNECTED_PREFIXES)
        or ended_reason.endswith("failed-to-connect-call")
    ):
        return "failed"
    return "ended"


def _absent() -> msgspec.Raw:
    # msgspec.Raw takes any JSON value but cannot share a union with None: absent is JSON null.
    return msgspec.Raw(b"null")


def _given(raw: msgspec.Raw) -> msgspec.Raw | None:
    """A raw field's value, or None if it was left out or null."""
    return None if bytes(raw) == b"null" else raw


VapiRole = Literal["system", "user", "bot", "assistant", "tool_calls", "tool_call_result", "tool"]


class CallRef(msgspec.Struct, frozen=True):
    id: ConversationId | None = None


class Mono(msgspec.Struct, frozen=True, rename="camel"):
    combined_url: str | None = None


class Recording(msgspec.Struct, frozen=True, rename="camel"):
    mono: Mono | None = None
    stereo_url: str | None = None


class VapiMessage(msgspec.Struct, frozen=True, rename="camel", gc=False):
    """One turn of ``artifact.messages`` (or of a snapshot's ``messages``): ``time`` in Unix ms;
    ``toolCalls`` on a ``tool_calls`` turn; ``toolCallId``, ``name``, ``result`` on a ``tool_call_result``."""

    role: VapiRole
    message: str | None = None
    time: float | None = None
    end_time: float | None = None
    seconds_from_start: float | None = None
    duration: float | None = None  # stored as sent: Vapi's schema says seconds, its examples send ms
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    result: Any = None


class Artifact(msgspec.Struct, frozen=True, rename="camel"):
    """``artifact``: what the call left behind. Presigned URLs are not read: they expire."""

    messages: msgspec.Raw = msgspec.field(default_factory=_absent)  # each entry is decoded on its own
    recording_url: str | None = None
    stereo_recording_url: str | None = None
    recording: Recording | None = None


class ServerMessage(msgspec.Struct, frozen=True, rename="camel"):
    """The ``message`` of a Vapi server message; fields other types carry are ignored."""

    type: EventType
    call: CallRef | None = None
    timestamp: float | None = None  # Unix milliseconds
    status: str | None = None
    ended_reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: msgspec.Raw = msgspec.field(default_factory=_absent)  # kept as sent
    artifact: Artifact | None = None
    messages: msgspec.Raw = msgspec.field(default_factory=_absent)  # the history so far, each entry alone
    recording_url: str | None = None  # deprecated, in favour of artifact.recordingUrl


class Envelope(msgspec.Struct, frozen=True):
    message: ServerMessage


class _BareMessage(msgspec.Struct, frozen=True):
    type: EventType
    call: CallRef | None = None


class _BareEnvelope(msgspec.Struct, frozen=True):
    """The least a message must hold to be stored: when a field of ``Envelope`` is of the wrong type."""

    message: _BareMessage


class _ToolResult(msgspec.Struct, rename="camel"):
    tool_call_id: str | None
    name: str | None
    result: Any


# --- The body as OpenAPI describes it: the models above with every raw field typed. parse() checks each
# of them, whatever the message's type, so a body these allow is accepted and one they refuse is not
# (tests/test_schemathesis.py sends both, generated from /openapi.json).


class DocumentedCall(msgspec.Struct, frozen=True):
    id: ConversationId


class DocumentedArtifact(msgspec.Struct, frozen=True, rename="camel"):
    messages: list[VapiMessage] | None = None
    recording_url: str | None = None
    stereo_recording_url: str | None = None
    recording: Recording | None = None


class DocumentedMessage(msgspec.Struct, frozen=True, rename="camel"):
    """``end-of-call-report``, ``status-update`` and ``conversation-update`` are stored as the README
    says; any other ``type`` is kept raw. Other fields are kept in the raw body, not read."""

    type: EventType
    call: DocumentedCall
    timestamp: float | None = None
    status: str | None = None
    ended_reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: dict[str, Any] | None = None
    artifact: DocumentedArtifact | None = None
    messages: list[VapiMessage] | None = None
    recording_url: str | None = None


class VapiServerMessage(msgspec.Struct, frozen=True):
    """A Vapi server message, as POSTed to the server URL."""

    message: DocumentedMessage


MESSAGES = "$.message.messages"
ARTIFACT_MESSAGES = "$.message.artifact.messages"


def parse(body: bytes, headers: Mapping[str, str], *, received_at: float) -> tuple[Record, list[Problem]]:
    """Map one server message to a delivery's record, and list what is wrong with it.

    Only a body that is not JSON, or a message without a type and a call id, raises: nothing can be
    stored. Past that, the raw message is always stored and every good transcript entry kept.
    """
    try:
        message = decode(body, Envelope).message
    except InvalidPayload as exc:
        bare = decode(body, _BareEnvelope).message  # raises if even the least is not there
        cid, key = _conversation_id(bare), f"{bare.type}:malformed:{received_at!r}"
        return _record(body, bare.type, cid, received_at, key), exc.problems
    cid, kind = _conversation_id(message), message.type
    stamp = _seconds(message.timestamp)
    # Its own time tells two snapshots (or two messages of another type) apart; never the body's hash.
    when = repr(message.timestamp) if message.timestamp is not None else f"received:{received_at!r}"
    snapshot = _given(message.messages)
    transcript = None  # the list whose entries become the conversation's messages
    patch = NO_CHANGE
    match kind:
        case "end-of-call-report":
            key, patch = kind, _end_of_call(message, stamp)
            transcript = ARTIFACT_MESSAGES
        case "status-update":
            key, patch = f"{kind}:{message.status}", _status_update(message, stamp)
        case "conversation-update":
            # A snapshot each time: its rows update the positions an earlier one wrote.
            key = f"{kind}:{when}"
            transcript = MESSAGES if snapshot is not None else ARTIFACT_MESSAGES
        case _:
            key = f"{kind}:{when}"  # kept raw, answered 2xx
    problems = []
    if bytes(message.analysis)[:1] not in (b"{", b"n"):
        problems.append(Problem("Expected `object | null`", "$.message.analysis"))
    rows: list[VendorMessageRow] = []
    rejected = 0
    for path, raw in ((MESSAGES, snapshot), (ARTIFACT_MESSAGES, _artifact_messages(message))):
        if raw is not None:
            entries, bad = _entries(raw, path)
            problems += bad
            if path == transcript:
                rows, rejected = _rows(cid, received_at, entries), len(bad)
    return _record(body, kind, cid, received_at, key, patch=patch, rows=rows, rejected=rejected), problems


def _conversation_id(message: ServerMessage | _BareMessage) -> str:
    if message.call is None or message.call.id is None:
        raise InvalidPayload([Problem("a Vapi message needs message.call.id", "$.message.call.id")])
    return message.call.id


def _record(
    body: bytes,
    event_type: str,
    cid: str,
    received_at: float,
    key: str,
    *,
    patch: ConversationPatch = NO_CHANGE,
    rows: list[VendorMessageRow] | None = None,
    rejected: int = 0,
) -> Record:
    rows = rows or []
    # NaN is the one value not equal to itself.
    stamps = [at for row in rows if (at := row[TIMESTAMP]) == at]
    return Record(
        key=f"{NAME}:{cid}:{key}",
        source=NAME,
        event_type=event_type,
        conversation_id=cid,
        received_at=received_at,
        body=body,
        patch=patch,
        rows=rows,
        rejected=rejected,
        last_message_at=(max(stamps) if stamps else received_at) if rows else None,  # type: ignore[type-var]
    )


def _end_of_call(message: ServerMessage, stamp: float | None) -> ConversationPatch:
    analysis = bytes(message.analysis)
    # Compact, whatever the sender's spacing: a report fetched back by reconcile (the API's formatting)
    # and the webhook's must leave the same text.
    compact = analysis[:1] == b"{" and analysis.strip() != b"{}"
    return ConversationPatch(
        status=_status_of(message.ended_reason),
        started_at=epoch_seconds(message.started_at),
        ended_at=epoch_seconds(message.ended_at) or stamp,
        end_reason=message.ended_reason,
        recording_uri=_recording_url(message),
        analysis=msgspec.json.encode(msgspec.json.decode(analysis)).decode() if compact else None,
    )


def _status_update(message: ServerMessage, stamp: float | None) -> ConversationPatch:
    if message.status == "in-progress":
        return ConversationPatch(started_at=stamp)
    if message.status == "ended":
        return ConversationPatch(
            status=_status_of(message.ended_reason), ended_at=stamp, end_reason=message.ended_reason
        )
    return NO_CHANGE


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


def _entries(raw: msgspec.Raw, path: str) -> tuple[list[tuple[int, VapiMessage]], list[Problem]]:
    """Each entry decoded on its own: one bad entry costs only itself."""
    try:
        items = decode(raw, list[msgspec.Raw], path=path)
    except InvalidPayload as exc:
        return [], exc.problems
    return decode_items(items, VapiMessage, path=path)


def _rows(cid: str, now: float, entries: Iterable[tuple[int, VapiMessage]]) -> list[VendorMessageRow]:
    return [
        vendor_row(
            cid,
            NAME,
            seq,
            ROLES[entry.role],
            _content(entry),
            entry.role,
            now,
            timestamp=_seconds(entry.time),
            seconds_from_start=entry.seconds_from_start,
            duration=entry.duration,
        )
        for seq, entry in entries
    ]


def _content(entry: VapiMessage) -> str:
    """What was said; for a tool call, the calls as JSON; for a tool's result, the result as JSON."""
    if entry.role == "tool_calls" and entry.tool_calls is not None:
        return msgspec.json.encode(entry.tool_calls).decode()
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
    body=VapiServerMessage,
    settings=VapiSettings,
    authenticate=authenticate,
    api=vapi_api.API,
)
