"""Tavus CVI conversation callbacks: msgspec models, and their mapping to a delivery's record.

Tavus documents no signature and no retries, and does not guarantee arrival order: every mapping here
is idempotent and changes only the columns its event knows about.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from daemon.decoding import decode, decode_items, delivery_key, epoch_seconds
from daemon.errors import InvalidPayload, Problem
from daemon.signatures import SignatureVerifier, parse_secrets
from daemon.sources import tavus_api
from daemon.sources.model import ConversationId, EventType, Role, Secret, Source, Verify, WebhookSettings, replay_with
from storage.deliveries import NO_CHANGE, NULL, TIMESTAMP, ConversationPatch, MessageRow, Record

NAME = "tavus"

Timestamp = float | str | None


class Envelope(msgspec.Struct, frozen=True):
    """A Tavus conversation callback. ``properties`` depends on ``event_type``: ``transcript`` for
    ``application.transcription_ready``, ``replica_id`` and ``shutdown_reason`` for ``system.shutdown``,
    and so on (see the README). Other keys are ignored."""

    conversation_id: ConversationId
    event_type: EventType
    properties: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    message_type: str | None = None
    timestamp: Timestamp = None
    # webhook_url echoes the callback URL with its secret: it is deliberately not a field here.


class Joined(msgspec.Struct, frozen=True):
    replica_id: str | None = None


class Shutdown(msgspec.Struct, frozen=True):
    replica_id: str | None = None
    shutdown_reason: str | None = None


class TranscriptEntry(msgspec.Struct, frozen=True, gc=False):
    role: Role
    content: str | None = None
    timestamp: Timestamp = None
    seconds_from_start: float | None = None
    duration: float | None = None
    inference_id: str | None = None


class TranscriptionReady(msgspec.Struct, frozen=True):
    transcript: list[TranscriptEntry]
    replica_id: str | None = None


class RawTranscript(msgspec.Struct, frozen=True):
    """The slow path, when something is wrong: keep every entry as raw JSON and check each alone."""

    transcript: list[msgspec.Raw]


class RecordingReady(msgspec.Struct, frozen=True):
    # The old shape (S3) and the new one (any storage provider); either may come.
    bucket_name: str | None = None
    s3_key: str | None = None
    duration: float | None = None
    storage_provider: str | None = None
    storage_uri: str | None = None


class PerceptionAnalysis(msgspec.Struct, frozen=True):
    analysis: str | None = None


class PerceptionUnavailable(msgspec.Struct, frozen=True):
    reason: str | None = None


class PostCallActionExecuted(msgspec.Struct, frozen=True):
    tool_name: str | None = None
    status: str | None = None
    request: Any = None
    response: Any = None


class RecordingCopyFailed(msgspec.Struct, frozen=True):
    error_message: str | None = None


class ReadyEnvelope(msgspec.Struct, frozen=True):
    """``application.transcription_ready`` decoded in one pass: the common event, and the big one."""

    conversation_id: ConversationId
    event_type: EventType  # as in Envelope: a body one path refuses, the other must refuse too
    properties: TranscriptionReady
    message_type: str | None = None
    timestamp: Timestamp = None


READY = "application.transcription_ready"
_READY_TOKEN = b'"application.transcription_ready"'
_READY_DECODER = msgspec.json.Decoder(ReadyEnvelope, strict=False)


PROPERTIES: dict[str, type[msgspec.Struct]] = {
    "system.replica_joined": Joined,
    "system.pal_joined": Joined,
    "system.shutdown": Shutdown,
    "application.transcription_ready": TranscriptionReady,
    "application.recording_ready": RecordingReady,
    "application.perception_analysis": PerceptionAnalysis,
    "application.perception_unavailable": PerceptionUnavailable,
    "application.post_call_action_executed": PostCallActionExecuted,
    "application.recording_copy_failed": RecordingCopyFailed,
}


def parse(body: bytes, headers: Mapping[str, str], *, received_at: float) -> tuple[Record, list[Problem]]:
    """Map one callback to a delivery's record, and list what is wrong with it.

    Only a body that is not JSON, or an envelope without a usable ``conversation_id`` and ``event_type``,
    raises (nothing can be stored). Past that, the record always carries the raw event, and a
    transcript with bad entries still carries every good one.
    """
    ready = _transcription_ready(body)
    if ready is not None:
        key = delivery_key(NAME, body, headers, ready.conversation_id)
        return _record(key, ready, body, received_at, ready.properties), []
    envelope = decode(body, Envelope)
    key = delivery_key(NAME, body, headers, envelope.conversation_id)
    kind = PROPERTIES.get(envelope.event_type)
    if kind is None:
        return _raw(key, envelope, body, received_at), []  # an event we do not know yet: kept raw, answered 2xx
    try:
        props = decode(envelope.properties, kind, path="$.properties")
    except InvalidPayload as exc:
        # The envelope is sound, so the raw event is still stored (replay can re-derive it once the
        # shape is understood); the answer names every problem.
        if kind is TranscriptionReady:
            return _parse_transcript_leniently(key, envelope, body, received_at)
        return _raw(key, envelope, body, received_at), exc.problems
    return _record(key, envelope, body, received_at, props), []


def _transcription_ready(body: bytes) -> ReadyEnvelope | None:
    """A well-formed transcript callback in one pass over the body (the envelope, then its properties,
    takes two: ~15 us more of a 40 KB body's ~65); None sends the body down the general path, which
    also names whatever is wrong. Tavus writes ``event_type`` after the properties, so it is looked
    for at both ends of the body only."""
    if _READY_TOKEN not in body[-512:] and _READY_TOKEN not in body[:512]:
        return None
    try:
        ready = _READY_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return ready if ready.event_type == READY else None


def _raw(key: str, envelope: Envelope, body: bytes, received_at: float) -> Record:
    """The raw event alone: nothing of it is understood (yet)."""
    return Record(
        key=key,
        source=NAME,
        event_type=envelope.event_type,
        conversation_id=envelope.conversation_id,
        received_at=received_at,
        body=body,
    )


def _record(
    key: str, envelope: Envelope | ReadyEnvelope, body: bytes, received_at: float, props: msgspec.Struct
) -> Record:
    """What a decoded event changes: its conversation's columns, and its messages."""
    cid = envelope.conversation_id
    if isinstance(props, Joined):
        # Tavus sends both names for one join: one key, so the second is a duplicate delivery. Only
        # for a join that decoded: a malformed one must not shadow the good one that follows.
        key = f"{NAME}:joined:{cid}"
    # When the event happened, by the sender's clock if it said, else by ours.
    at = epoch_seconds(envelope.timestamp) or received_at
    rows: list[MessageRow] = []
    match props:
        case Joined(replica_id=replica_id):
            patch = ConversationPatch(replica_id=replica_id, started_at=at)
        case Shutdown(replica_id=replica_id, shutdown_reason=reason):
            patch = ConversationPatch(replica_id=replica_id, shutdown_reason=reason, status="ended", ended_at=at)
        case TranscriptionReady(transcript=transcript, replica_id=replica_id):
            patch = ConversationPatch(replica_id=replica_id, status="ended")
            rows = _transcript(cid, received_at, enumerate(transcript))
        case RecordingReady():
            patch = ConversationPatch(
                recording_provider=props.storage_provider or ("s3" if props.bucket_name else None),
                recording_duration=props.duration,
                recording_uri=props.storage_uri
                or (f"s3://{props.bucket_name}/{props.s3_key}" if props.bucket_name and props.s3_key else None),
            )
        case PerceptionAnalysis(analysis=analysis):
            patch = ConversationPatch(perception_analysis=analysis)
        case PerceptionUnavailable(reason=reason):
            patch = ConversationPatch(perception_unavailable_reason=reason or "unavailable")
        case RecordingCopyFailed(error_message=error_message):
            patch = ConversationPatch(recording_error=error_message or "recording copy failed")
        case _:
            patch = NO_CHANGE  # post-call actions live in the events table, raw
    return Record(
        key=key,
        source=NAME,
        event_type=envelope.event_type,
        conversation_id=cid,
        received_at=received_at,
        body=body,
        patch=patch,
        rows=rows,
        last_message_at=_last_message_at(rows, received_at),
    )


def _parse_transcript_leniently(
    key: str, envelope: Envelope, body: bytes, received_at: float
) -> tuple[Record, list[Problem]]:
    """The transcript did not decode as a whole: store the entries that are right, name the others.
    Each other property is checked on its own, so a bad ``replica_id`` costs no message."""
    try:
        raw = decode(envelope.properties, RawTranscript, path="$.properties")
    except InvalidPayload as exc:
        return _raw(key, envelope, body, received_at), exc.problems
    good, problems = decode_items(raw.transcript, TranscriptEntry, path="$.properties.transcript")
    rejected = len(problems)
    try:
        replica_id = decode(envelope.properties, Joined, path="$.properties").replica_id
    except InvalidPayload as exc:
        problems.extend(exc.problems)
        replica_id = None
    rows = _transcript(envelope.conversation_id, received_at, good)
    record = Record(
        key=key,
        source=NAME,
        event_type=envelope.event_type,
        conversation_id=envelope.conversation_id,
        received_at=received_at,
        body=body,
        patch=ConversationPatch(status="ended", replica_id=replica_id),
        rows=rows,
        last_message_at=_last_message_at(rows, received_at),
        rejected=rejected,
    )
    return record, problems


def _transcript(cid: str, now: float, entries: Any) -> list[MessageRow]:
    # NULL (NaN) rather than None: the writer binds these rows in bulk (see storage.deliveries.NULL).
    return [
        (
            cid,
            NAME,
            seq,
            entry.role,
            entry.content or "",
            NULL if (at := epoch_seconds(entry.timestamp)) is None else at,
            NULL if (offset := entry.seconds_from_start) is None else offset,
            NULL if (duration := entry.duration) is None else duration,
            NULL if (inference_id := entry.inference_id) is None else inference_id,
            NULL,
            now,
        )
        for seq, entry in entries
    ]


def _last_message_at(rows: list[MessageRow], received_at: float) -> float | None:
    if not rows:
        return None
    # NaN is the one value not equal to itself.
    return max((at for row in rows if (at := row[TIMESTAMP]) == at), default=received_at)  # type: ignore[type-var]


class TavusSettings(WebhookSettings, frozen=True):
    """``webhooks.tavus.*``."""

    # If set: whsec_<base64> (several, space-separated, to rotate); deliveries need a valid Standard
    # Webhooks signature (for callbacks relayed through a gateway: Tavus itself signs nothing).
    signing_secret: Secret = ""
    signature_tolerance_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # Reconcile fetches missed conversations from Tavus's API with this key (x-api-key); "" turns it off.
    api_key: Secret = ""
    api_url: str = "https://tavusapi.com"

    def __post_init__(self) -> None:
        # A secret that cannot be used stops start-up, rather than refusing every delivery.
        parse_secrets(self.signing_secret)


def authenticate(settings: TavusSettings) -> Verify | None:
    if not settings.signing_secret.strip():
        return None
    # Over the bytes as received, before anything decodes or stores them.
    return SignatureVerifier(settings.signing_secret, tolerance_s=settings.signature_tolerance_s).verify


SOURCE = Source(
    name=NAME,
    title="A Tavus conversation callback",
    parse=parse,
    replay=replay_with(parse),
    events=frozenset(PROPERTIES),
    body=Envelope,
    settings=TavusSettings,
    authenticate=authenticate,
    api=tavus_api.API,
)
