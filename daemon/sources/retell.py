"""Retell AI call webhooks: the signature, msgspec models of the body, and their mapping to a delivery.

Body: ``{"event": ..., "call": {...}}`` (``data`` is the deprecated name of ``call``). Retell retries a
delivery up to 3 times when no 2xx comes within 10 s, and may send events out of order, so every
mapping is idempotent: the delivery key is the event and the call id, and messages are keyed by their
position in the transcript, so ``call_analyzed`` after ``call_ended`` (the same transcript plus the
analysis) updates rather than duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from daemon.decoding import body_key, decode, validation_problem
from daemon.errors import InvalidPayload, Problem, Unauthorized, Unavailable
from daemon.sources import retell_api
from daemon.sources.model import (
    ConversationId,
    EventType,
    Message,
    NormalRole,
    Role,
    Secret,
    Source,
    Verify,
    WebhookSettings,
    message_rows,
    replay_with,
)
from storage.deliveries import ConversationPatch, Record

NAME = "retell"

# ---------------------------------------------------------------------------------------------------
# The signature: X-Retell-Signature: v=<Unix ms>,d=<hex HMAC-SHA256(api key, raw body + str(ms))>.

SIGNATURE_HEADER = "x-retell-signature"
_SHOWN = "X-Retell-Signature"
DEFAULT_TOLERANCE_MS = 5 * 60 * 1000  # the SDK's FIVE_MINUTES
# As retell.lib.webhook_auth matches it, but ASCII digits only (Python's \d also takes other scripts'
# digits) and at most 16 past any leading zeros: Unix milliseconds have 13 until the year 2286, and
# int() of a megabyte of digits is not free.
_SIGNATURE = re.compile(r"v=0*([0-9]{1,16}),d=([0-9a-f]{64})", re.ASCII)


def parse_keys(setting: str) -> tuple[bytes, ...]:
    """The keys of ``webhooks.retell.api_key``: one or more, space-separated, so a key can be rotated."""
    return tuple(key.encode() for key in setting.split())


class RetellVerifier:
    """Checks ``X-Retell-Signature`` over a delivery's raw body, as Retell's Python SDK does.

    The digest is HMAC-SHA256 keyed with the API key (the one with the webhook badge) over the body
    followed by the timestamp's digits. A timestamp more than ``tolerance_ms`` from ``clock()`` (Unix
    seconds), either way, is refused; exactly ``tolerance_ms`` is accepted, as in the SDK. Every key
    is compared, match or not, in constant time, so the time taken says nothing about which matched.
    A refusal is a 401 naming the failed check; it never echoes a key or a signature.
    """

    def __init__(
        self, api_keys: str, *, tolerance_ms: int = DEFAULT_TOLERANCE_MS, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = parse_keys(api_keys)
        if not self.keys:
            raise ValueError("no Retell API key is configured")
        self.tolerance_ms = tolerance_ms
        self.clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if ``body`` is signed with one of the keys, recently enough; raise ``Unauthorized`` if not."""
        signature = headers.get(SIGNATURE_HEADER)
        if signature is None or not signature.strip():
            raise Unauthorized(f"missing {_SHOWN} header: the delivery must be signed")
        match = _SIGNATURE.fullmatch(signature)
        if match is None:
            raise Unauthorized(f"malformed {_SHOWN} header: expected v=<Unix milliseconds>,d=<64 lowercase hex digits>")
        # The SDK signs and checks str(int(v)): zero-padded, the same instant is signed without the zeros.
        stamp = int(match[1])
        skew = stamp - round(self.clock() * 1000)
        if skew < -self.tolerance_ms:
            raise Unauthorized(f"{_SHOWN} timestamp is too old (more than {self.tolerance_ms / 1000:g} s ago)")
        if skew > self.tolerance_ms:
            raise Unauthorized(f"{_SHOWN} timestamp is in the future (more than {self.tolerance_ms / 1000:g} s ahead)")
        given = match[2].encode()
        suffix = str(stamp).encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(_digest(key, body, suffix), given)
        if not matched:
            raise Unauthorized(f"{_SHOWN} does not match: wrong API key, or the body was altered")


def _digest(key: bytes, body: bytes, suffix: bytes) -> bytes:
    """Hex HMAC-SHA256 of ``body + suffix``, without copying a body that may be megabytes."""
    mac = hmac.new(key, body, hashlib.sha256)
    mac.update(suffix)
    return mac.hexdigest().encode()


# ---------------------------------------------------------------------------------------------------
# The body.


CALL_STARTED = "call_started"
CALL_ENDED = "call_ended"
CALL_ANALYZED = "call_analyzed"
TRANSCRIPT_UPDATED = "transcript_updated"
# The events whose call object is mapped; any other (transfer_*, chat_*, what Retell adds next) is
# stored raw and answered 2xx.
EVENTS = frozenset({CALL_STARTED, CALL_ENDED, CALL_ANALYZED, TRANSCRIPT_UPDATED})


class Envelope(msgspec.Struct, frozen=True):
    """A Retell webhook. ``call`` is the call object of the get-call API (all of it but ``call_analysis``
    on ``call_ended``); ``chat`` comes instead on the chat agents' events. Other keys are ignored."""

    event: EventType
    call: dict[str, msgspec.Raw] | None = None
    data: dict[str, msgspec.Raw] | None = None  # the deprecated name of ``call``
    chat: dict[str, msgspec.Raw] | None = None


class Word(msgspec.Struct, frozen=True, gc=False):
    # Seconds from the start of the call's audio, "an approximation" (Retell).
    start: float | None = None
    end: float | None = None


class Entry(msgspec.Struct, frozen=True):
    """One entry of ``transcript_object`` or ``transcript_with_tool_calls``; which fields come depends on
    ``role`` (the SDK's ``TranscriptWithToolCall`` union), so all but ``role`` are optional here."""

    role: Role
    content: str | None = None
    words: list[Word] | None = None
    digit: str | None = None  # dtmf
    time_sec: float | None = None  # sms, injected; seen on tool calls too


# What OpenAPI shows of a Retell body. Decoding does not use these: it reads only the fields it maps
# (Envelope, Entry), so an odd value in a field that is merely kept as JSON costs nothing.


class RetellWord(msgspec.Struct, frozen=True):
    word: str | None = None
    start: float | None = None  # seconds from the start of the call's audio
    end: float | None = None


class RetellTranscriptEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An utterance (``agent``, ``user``, ``transfer_target``), a tool call (``tool_call_invocation``:
    ``tool_call_id``, ``name``, ``arguments``) or its result (``tool_call_result``: ``tool_call_id``,
    ``content``, ``successful``), or ``node_transition``, ``dtmf`` (``digit``), ``sms``, ``injected``."""

    role: str
    content: str | None = None
    words: list[RetellWord] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    successful: bool | None = None
    digit: str | None = None
    time_sec: float | None = None


class RetellCall(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of Retell's call object that transcriptd maps; the whole body is kept raw."""

    call_id: str
    call_status: str | None = None  # registered, not_connected, ongoing, ended, error
    start_timestamp: int | None = None  # Unix milliseconds
    end_timestamp: int | None = None
    disconnection_reason: str | None = None
    recording_url: str | None = None
    call_analysis: dict[str, Any] | None = None  # on call_analyzed
    transcript_object: list[RetellTranscriptEntry] | None = None
    transcript_with_tool_calls: list[RetellTranscriptEntry] | None = None


class RetellWebhook(msgspec.Struct, frozen=True):
    """A Retell webhook, signed in ``X-Retell-Signature``: ``call_started``, ``call_ended``,
    ``call_analyzed`` and ``transcript_updated`` are mapped; any other event is stored raw."""

    event: str
    call: RetellCall


@dataclass(slots=True)
class CallFields:
    """What an event says about its call; None leaves a column as it is."""

    status: Literal["active", "ended", "failed"] | None = None
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    recording_url: str | None = None
    analysis: str | None = None  # call_analysis, as compact JSON


@dataclass(slots=True)
class ParsedCall:
    """One body, decoded: whose call, what it changes, its transcript, and what was wrong with it."""

    event: str
    call_id: str
    key: str
    fields: CallFields
    messages: list[Message]
    rejected: int
    problems: list[Problem]


# How each vendor role reads in the normalised model. transfer_target is the person a call was
# transferred to: a human on the line, like the user. dtmf and sms are the user's own input (a key
# pressed, a text sent during the call); injected is context an app pushed into the live call, and
# node_transition a step of the agent's conversation flow: neither was said by anyone, so both are
# system messages. Any role Retell adds later is kept the same way, as a system message.
ROLES: dict[str, NormalRole] = {
    "agent": "assistant",
    "user": "user",
    "transfer_target": "user",
    "tool_call_invocation": "tool",
    "tool_call_result": "tool",
    "dtmf": "user",
    "sms": "user",
    "injected": "system",
    "node_transition": "system",
}
# Entries whose content is the entry itself, as JSON: the tool call (id, name, arguments as Retell's
# JSON string), its result (id, successful, content), the flow's step (former and new node).
_AS_JSON = frozenset({"tool_call_invocation", "tool_call_result", "node_transition"})
_SPOKEN = frozenset({"agent", "user", "transfer_target"})

# The call object's fields this module maps, with their types; the rest stays in the raw event.
_CALL_FIELDS: dict[str, object] = {
    "call_status": str | None,
    "start_timestamp": float | None,  # Unix ms
    "end_timestamp": float | None,
    "disconnection_reason": str | None,
    "recording_url": str | None,
}
# call_status values of a call that never got through (dial failed, no answer, busy) or broke.
_FAILED = frozenset({"not_connected", "error"})
_ENTRY = msgspec.json.Decoder(Entry, strict=False)
_ANY = msgspec.json.Decoder(strict=False)


def parse_call(body: bytes) -> ParsedCall:
    """Decode one webhook body and map it; only a body that is not JSON, or has no event or call id,
    raises (nothing can be stored). Past that, every problem is listed and the rest still mapped:
    a bad transcript entry costs that entry only, a bad call field that field only."""
    envelope = decode(body, Envelope)
    call, where = (envelope.call, "$.call") if envelope.call is not None else (envelope.data, "$.data")
    if call is None and envelope.chat is not None and envelope.event not in EVENTS:
        # A chat agent's event: kept raw under its chat id, as any event this module does not map.
        call, where = envelope.chat, "$.chat"
        call_id = _required_id(call, "chat_id", where)
    elif call is None:
        raise InvalidPayload([Problem("Object missing required field `call`", "$")])
    else:
        call_id = _required_id(call, "call_id", where)
    event = envelope.event
    parsed = ParsedCall(event, call_id, delivery_key(event, call_id, body), CallFields(), [], 0, [])
    if event in EVENTS:
        _map_call(parsed, call, where)
    return parsed


def delivery_key(event: str, call_id: str, body: bytes) -> str:
    """Retell's own advice: a delivery is its event and call id (a retry of ``call_ended`` may differ in
    its signed URLs, so never the body's hash). ``transcript_updated`` comes many times per call, each a
    fuller snapshot: those, and events this module does not map, are told apart by their body."""
    if event in EVENTS and event != TRANSCRIPT_UPDATED:
        return f"{NAME}:{event}:{call_id}"
    return body_key(NAME, body, event, call_id)


def _required_id(call: dict[str, msgspec.Raw], name: str, where: str) -> str:
    raw = call.get(name)
    if raw is None:
        raise InvalidPayload([Problem(f"Object missing required field `{name}`", where)])
    return decode(raw, ConversationId, path=f"{where}.{name}")


def _map_call(parsed: ParsedCall, call: dict[str, msgspec.Raw], where: str) -> None:
    values: dict[str, object] = {}
    for name, type_ in _CALL_FIELDS.items():
        raw = call.get(name)
        if raw is None:
            continue
        try:
            values[name] = msgspec.json.decode(raw, type=type_, strict=False)
        except msgspec.ValidationError as exc:
            parsed.problems.append(validation_problem(exc, f"{where}.{name}"))
    fields = parsed.fields
    fields.started_at = _seconds(values.get("start_timestamp"))
    fields.ended_at = _seconds(values.get("end_timestamp"))
    fields.end_reason = _text(values.get("disconnection_reason"))
    fields.recording_url = _text(values.get("recording_url"))
    status = _text(values.get("call_status"))
    if parsed.event == CALL_STARTED:
        fields.status = "active"
    elif parsed.event in (CALL_ENDED, CALL_ANALYZED):
        fields.status = "failed" if status in _FAILED else "ended"
    # transcript_updated changes no status: its final snapshot may come after call_ended.
    analysis = call.get("call_analysis")
    if analysis is not None:
        fields.analysis = _compact(analysis)
    # With tool calls, Retell weaves them into transcript_with_tool_calls, in order; transcript_object
    # has the spoken turns only. One of the two is the transcript, and every event carrying tool calls
    # carries that one, so positions stay the same from one event of the call to the next.
    name = "transcript_with_tool_calls"
    raw = call.get(name)
    entries = _list(raw, f"{where}.{name}", parsed.problems)
    if not entries:
        name = "transcript_object"
        entries = _list(call.get(name), f"{where}.{name}", parsed.problems)
    parsed.messages, problems = transcript(entries, path=f"{where}.{name}")
    parsed.rejected = len(problems)
    parsed.problems.extend(problems)


def _list(raw: msgspec.Raw | None, path: str, problems: list[Problem]) -> list[msgspec.Raw]:
    if raw is None:
        return []
    try:
        return msgspec.json.decode(raw, type=list[msgspec.Raw] | None) or []
    except msgspec.ValidationError as exc:
        problems.append(validation_problem(exc, path))
        return []


def transcript(entries: list[msgspec.Raw], *, path: str) -> tuple[list[Message], list[Problem]]:
    """Normalised messages of a transcript's entries, each at its index; a bad entry is named, not stored."""
    messages: list[Message] = []
    problems: list[Problem] = []
    for seq, raw in enumerate(entries):
        try:
            entry = _ENTRY.decode(raw)
        except msgspec.ValidationError as exc:
            problems.append(validation_problem(exc, f"{path}[{seq}]"))
            continue
        except RecursionError:
            problems.append(Problem("nested too deeply", f"{path}[{seq}]"))
            continue
        messages.append(message(seq, entry, raw))
    return messages, problems


def message(seq: int, entry: Entry, raw: msgspec.Raw | bytes) -> Message:
    """One entry as a normalised message: its role mapped, its content as said (or, for tool calls and
    flow steps, the entry as JSON), its timing from its words (or ``time_sec``) where there is any."""
    role = entry.role
    if role in _AS_JSON:
        content = _without_role(raw)
    elif entry.content is not None:
        content = entry.content
    elif role == "dtmf" and entry.digit is not None:
        content = entry.digit
    elif role in _SPOKEN:
        content = ""
    else:
        content = _without_role(raw)  # a role Retell adds later: whatever it carries is kept
    offset, duration = _timing(entry)
    return Message(seq, ROLES.get(role, "system"), role, content, seconds_from_start=offset, duration=duration)


def _timing(entry: Entry) -> tuple[float | None, float | None]:
    """Seconds from the call's start and duration: from the first word's start to the last word's end.

    Retell lists words in order, so only the ends are looked at (scanning every word's times took two
    thirds of a long call's parse)."""
    words = entry.words
    if words:
        first = next((w.start for w in words if w.start is not None), None)
        if first is not None and math.isfinite(first):
            last = next((w.end for w in reversed(words) if w.end is not None), None)
            if last is None or not math.isfinite(last) or last < first:
                return first, None
            # Rounded to the microsecond: 11.8 - 11.5 is 0.3000000000000007 in floats.
            return first, round(last - first, 6)
    if entry.time_sec is not None and math.isfinite(entry.time_sec):
        return entry.time_sec, None
    return None, None


def _without_role(raw: msgspec.Raw | bytes) -> str:
    """The entry as compact JSON, in the sender's key order, without ``role`` (stored beside it)."""
    value = _ANY.decode(raw)
    if isinstance(value, dict):
        value.pop("role", None)
    return msgspec.json.encode(value).decode()


def _compact(raw: msgspec.Raw) -> str | None:
    value = _ANY.decode(raw)
    return None if value is None else msgspec.json.encode(value).decode()


def _seconds(milliseconds: object) -> float | None:
    if isinstance(milliseconds, float) and math.isfinite(milliseconds):
        return milliseconds / 1000
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------------
# The source: settings, authentication, and the delivery a body makes.


class RetellSettings(WebhookSettings, frozen=True):
    """``webhooks.retell.*``."""

    # The Retell API key with the webhook badge (several, space-separated, while rotating): every delivery's
    # X-Retell-Signature must verify with one. Unset, every Retell delivery is answered 503.
    api_key: Secret = ""
    signature_tolerance_s: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_TOLERANCE_MS / 1000
    # Reconcile fetches missed calls from Retell's API with api_key (its first key, while rotating).
    api_url: str = "https://api.retellai.com"


def authenticate(settings: RetellSettings) -> Verify:
    if not settings.api_key.strip():
        # Retell signs every delivery: without the key nothing can tell a forged call from a real one.
        return _no_api_key
    return RetellVerifier(settings.api_key, tolerance_ms=round(settings.signature_tolerance_s * 1000)).verify


def _no_api_key(body: bytes, headers: Mapping[str, str]) -> None:
    # Our configuration is missing, not the sender's signature: a 503 (ours to fix), never a 401.
    raise Unavailable("webhooks.retell.api_key is not set: no Retell delivery can be verified", retry_after=60)


def parse(body: bytes, headers: Mapping[str, str], *, received_at: float) -> tuple[Record, list[Problem]]:
    """One webhook as a delivery's record: its call's fields, and its transcript by position (see ``parse_call``)."""
    parsed = parse_call(body)
    cid, fields = parsed.call_id, parsed.fields
    # Retell gives no wall-clock time per message, only offsets from the call's start: timestamp stays
    # empty rather than guessed. The vendor role is kept where it says more than the normalised one.
    rows = message_rows(cid, NAME, parsed.messages, received_at)
    # Not decoding.delivery_key: it hashes the body (2 ms a megabyte), and Retell's key is its own.
    record = Record(
        key=parsed.key,
        source=NAME,
        event_type=parsed.event,
        conversation_id=cid,
        received_at=received_at,
        body=body,
        patch=ConversationPatch(
            status=fields.status,
            started_at=fields.started_at,
            ended_at=fields.ended_at,
            end_reason=fields.end_reason,
            recording_uri=fields.recording_url,
            analysis=fields.analysis,
        ),
        rows=rows,
        rejected=parsed.rejected,
        last_message_at=(fields.ended_at or received_at) if rows else None,
    )
    return record, parsed.problems


SOURCE: Source[RetellSettings] = Source(
    name=NAME,
    title="A Retell call event, signed in X-Retell-Signature",
    parse=parse,
    replay=replay_with(parse),
    events=EVENTS,
    body=RetellWebhook,
    settings=RetellSettings,
    authenticate=authenticate,
    api=retell_api.API,
)
