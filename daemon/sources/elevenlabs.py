"""ElevenLabs Agents post-call webhooks, as a source: ``POST /webhooks/elevenlabs[/{token}]``.

Every delivery must carry a valid ``ElevenLabs-Signature`` (``elevenlabs_signature``); the body maps to
messages and conversation fields in ``elevenlabs_events``. ElevenLabs counts only an exact 200 as
delivered, which is what a stored delivery is answered in durable mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec

from daemon.decoding import delivery_key
from daemon.errors import Problem, Unavailable
from daemon.sources import elevenlabs_api
from daemon.sources.elevenlabs_events import EVENT_TYPES, NAME, Envelope, parse_event
from daemon.sources.elevenlabs_signature import DEFAULT_FUTURE_SKEW_S, DEFAULT_TOLERANCE_S, ElevenLabsSignature
from daemon.sources.model import Parse, Secret, Source, Verify, WebhookSettings, message_rows, replay_with
from storage.deliveries import ConversationPatch, Record

# A 10-minute call at 128 kbit/s is ~13 MiB of base64 MP3, near ingest.max_body_bytes already; this takes
# calls of about 50 minutes. The audio is not kept (see keep_audio): only the request holds it, while read.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class ElevenLabsSettings(WebhookSettings, frozen=True):
    """``webhooks.elevenlabs.*``."""

    # The webhook's HMAC secret, as ElevenLabs shows it (several, space-separated, to rotate). Required:
    # without it every delivery is answered 503, since nothing could tell a forged one from a real one.
    signing_secret: Secret = ""
    signature_tolerance_s: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_TOLERANCE_S
    signature_future_skew_s: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_FUTURE_SKEW_S
    # post_call_audio: keep the body whole in the event log (base64 MP3, tens of MB), instead of the
    # envelope with the audio replaced by its length, SHA-256 and decoded size.
    keep_audio: bool = False
    # The largest body taken on this path, in place of ingest.max_body_bytes: audio bodies are large.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_BODY_BYTES
    # Reconcile fetches missed conversations from ElevenLabs' API with this key (xi-api-key); "" turns it off.
    api_key: Secret = ""
    api_url: str = "https://api.elevenlabs.io"


def authenticate(settings: ElevenLabsSettings) -> Verify:
    if not settings.signing_secret.strip():
        return _no_secret
    return ElevenLabsSignature(
        settings.signing_secret,
        tolerance_s=settings.signature_tolerance_s,
        future_skew_s=settings.signature_future_skew_s,
    ).verify


def _no_secret(body: bytes, headers: Mapping[str, str]) -> None:
    # Our configuration is missing, not the sender's signature: a 503, which ElevenLabs retries (when
    # retries are on) once the secret is set, rather than a 401 it would give up on.
    raise Unavailable("webhooks.elevenlabs.signing_secret is not set: no delivery can be authenticated", retry_after=60)


def parse_with(settings: ElevenLabsSettings) -> Parse:
    """The parser for these settings (whether the raw event keeps the audio)."""
    keep_audio = settings.keep_audio

    def parse_configured(
        body: bytes, headers: Mapping[str, str], *, received_at: float
    ) -> tuple[Record, list[Problem]]:
        return _parse(body, headers, received_at, keep_audio=keep_audio)

    return parse_configured


def parse(body: bytes, headers: Mapping[str, str], *, received_at: float) -> tuple[Record, list[Problem]]:
    """One webhook body as a delivery's record, with the default settings (the audio is not kept)."""
    return _parse(body, headers, received_at, keep_audio=False)


def _parse(
    body: bytes, headers: Mapping[str, str], received_at: float, *, keep_audio: bool
) -> tuple[Record, list[Problem]]:
    event, problems = parse_event(body, keep_audio=keep_audio)
    # Its key is type + event_timestamp + conversation_id, as ElevenLabs documents; an id header is still
    # checked (an over-long one is a 400), as for every source.
    delivery_key(NAME, event.stored_body, headers, event.conversation_id)
    call, now = event.call, received_at
    rows = message_rows(event.conversation_id, NAME, event.messages, now)
    last = max((m.timestamp for m in event.messages if m.timestamp is not None), default=now) if rows else None
    record = Record(
        key=event.key,
        source=NAME,
        event_type=event.event_type,
        conversation_id=event.conversation_id,
        received_at=received_at,
        body=event.stored_body,
        patch=ConversationPatch(
            status=call.status,
            started_at=call.started_at,
            ended_at=call.ended_at,
            end_reason=call.end_reason,
            analysis=call.analysis,
        ),
        rows=rows,
        rejected=event.rejected,
        last_message_at=last,
    )
    return record, problems


SOURCE = Source(
    name=NAME,
    title="An ElevenLabs Agents post-call webhook",
    parse=parse,
    replay=replay_with(parse),  # the event log holds what parse stored: already without the audio
    events=frozenset(EVENT_TYPES),
    body=Envelope,
    settings=ElevenLabsSettings,
    authenticate=authenticate,
    parse_with=parse_with,
    max_body_bytes=lambda settings: settings.max_body_bytes,
    enqueued_status=200,  # ElevenLabs counts only a 200 as delivered, in either ack mode
    api=elevenlabs_api.API,
)
