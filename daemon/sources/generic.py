"""The generic intake format: one message or a list, for apps that forward utterances as they happen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from daemon.decoding import decode, decode_items, delivery_key, epoch_seconds
from daemon.errors import InvalidPayload, Problem
from daemon.sources.model import ConversationId, Role, Source
from storage.deliveries import APPEND_TIMESTAMP, AppendRow, Record
from storage.replay import StoredEvent

NAME = "api"
EVENT_TYPE = "api.messages"
ExternalId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class IncomingMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One message. ``id`` is the client's own: a message whose id was seen before is not stored again."""

    role: Role
    content: str
    id: ExternalId | None = None
    timestamp: float | str | None = None


def check_conversation_id(conversation_id: str) -> str:
    try:
        return msgspec.convert(conversation_id, ConversationId)
    except msgspec.ValidationError as exc:
        raise InvalidPayload([Problem(f"conversation id: {exc}", "path.conversation_id")]) from None


def parse(
    body: bytes, headers: Mapping[str, str], *, received_at: float, conversation_id: str
) -> tuple[Record, list[Problem]]:
    """Messages are appended after the conversation's last one; each bad item is named, the rest kept."""
    cid = check_conversation_id(conversation_id)
    items: list[tuple[int, IncomingMessage]]
    problems: list[Problem] = []
    if body.lstrip()[:1] == b"[":
        items, problems = decode_items(decode(body, list[msgspec.Raw]), IncomingMessage, path="$")
    else:
        items = [(0, decode(body, IncomingMessage))]
    rows: list[AppendRow] = [
        (cid, NAME, m.role, m.content, epoch_seconds(m.timestamp), m.id, received_at) for _, m in items
    ]
    stamps = [at for row in rows if (at := row[APPEND_TIMESTAMP]) is not None]
    record = Record(
        # Without a client id, the same body to the same conversation is a retry, not new messages.
        key=delivery_key(NAME, body, headers, cid),
        source=NAME,
        event_type=EVENT_TYPE,
        conversation_id=cid,
        received_at=received_at,
        body=body,
        append_rows=rows,
        rejected=len(problems),
        last_message_at=max(stamps, default=received_at) if rows else None,
    )
    return record, problems


def replay(event: StoredEvent) -> Record:
    return parse(event.body, {}, received_at=event.received_at, conversation_id=event.conversation_id)[0]


SOURCE: Source[Any] = Source(
    name=NAME,
    title="Append one message or a list of them to a conversation",
    parse=parse,
    replay=replay,
    events=frozenset({EVENT_TYPE}),
    body=IncomingMessage | list[IncomingMessage],
    settings=None,
    path="/conversations/{conversation_id}/messages",
    bearer=True,
    operation="post_messages",
)
