"""What one outbound webhook says, and how it is signed (Standard Webhooks, as the intake verifies them).

The body tells what changed and where to read it; ``webhook-id`` is the change's id (``chg_<position>``),
the same on every attempt, so a receiver dedupes re-sends by it.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from typing import Any

import msgspec

from daemon import __version__
from daemon.ids import quoted
from daemon.signatures import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from storage.notifications import Due
from storage.portable import fetch_all
from storage.queries import Message

CHANGED = "conversation.changed"
ERASED = "conversation.erased"
# A change that added or updated more messages than this carries none of them even with include_messages:
# the body stays bounded, and the receiver reads them from messages_url.
MAX_PUSHED_MESSAGES = 1000

MESSAGES = (
    "SELECT seq, role, content, source, timestamp, seconds_from_start, duration, inference_id, external_id, "
    "vendor_role FROM messages WHERE conversation_id = ? AND source = ? AND seq BETWEEN ? AND ? ORDER BY seq"
)


class ChangeData(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str  # chg_<position>, also the webhook-id header
    position: int  # in the change feed: GET /changes?after=<position - 1> starts here
    conversation_id: str
    source: str
    status: str | None
    changes: dict[str, int]  # what changed, and how much: messages_added, messages_updated, status, ...
    committed_at: str  # ISO-8601, UTC
    url: str  # the conversation on this daemon's read API
    messages_url: str
    first_seq: int | None = None  # the messages added or updated: seq first_seq..last_seq of this source
    last_seq: int | None = None
    messages: list[Message] | None = None  # with notify.include_messages


class Notification(msgspec.Struct):
    type: str
    timestamp: str
    data: ChangeData


def change_id(position: int) -> str:
    return f"chg_{position}"


def body(change: Due, messages: list[Message] | None = None) -> bytes:
    """The JSON body of ``change``'s notification (``change`` must still be in the outbox)."""
    assert change.source is not None
    assert change.committed_at is not None
    kinds = msgspec.json.decode(change.kinds or "{}", type=dict[str, int])
    path = f"/conversations/{quoted(change.conversation_id)}"
    data = ChangeData(
        id=change_id(change.position),
        position=change.position,
        conversation_id=change.conversation_id,
        source=change.source,
        status=change.status,
        changes=kinds,
        committed_at=iso(change.committed_at),
        url=path,
        messages_url=f"{path}/messages?source={change.source}",
        first_seq=change.first_seq,
        last_seq=change.last_seq,
        messages=messages,
    )
    kind = ERASED if kinds.get("erased") else CHANGED
    return msgspec.json.encode(Notification(kind, iso(change.committed_at), data))


def pushed_messages(conn: Any, change: Due) -> list[Message] | None:
    """The messages ``change`` added or updated, as they are now (None: none, or too many to push)."""
    if change.first_seq is None or change.last_seq is None or change.source is None:
        return None
    if change.last_seq - change.first_seq >= MAX_PUSHED_MESSAGES:
        return None
    rows = fetch_all(conn, MESSAGES, (change.conversation_id, change.source, change.first_seq, change.last_seq))
    return [Message(*row) for row in rows]


def headers(keys: tuple[bytes, ...], position: int, timestamp: int, content: bytes) -> dict[str, str]:
    webhook_id = change_id(position)
    return {
        "content-type": "application/json",
        "user-agent": f"transcriptd/{__version__}",
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(keys, webhook_id, timestamp, content),
    }


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header in seconds from ``now``: delta-seconds or an HTTP date (None: absent or bad)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
