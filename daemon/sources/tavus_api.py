"""Tavus's API, for reconcile: list recent conversations, and fetch one with the events it pushed.

``GET /v2/conversations/{id}?verbose=true`` returns the conversation with ``events[]``, each
``{event_type, message_type, properties, timestamp}`` as the callback carried it: each becomes the
callback body again, parsed by ``tavus.parse``. ``GET /v2/conversations?limit=&page=`` lists them,
``{"data": [...], "total_count": N}``, newest first. Auth: ``x-api-key``.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import msgspec

from daemon.decoding import epoch_seconds
from daemon.sources.model import ApiClient, Fetched, Listed
from daemon.vendor_http import VendorHttp

PAGE_SIZE = 100
MAX_PAGES = 1000  # a bound on one listing, whatever total_count says


class Event(msgspec.Struct, frozen=True):
    event_type: str
    properties: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    message_type: str | None = None
    timestamp: Any = None


class Conversation(msgspec.Struct, frozen=True):
    conversation_id: str
    status: str | None = None
    created_at: Any = None
    events: list[Event] = msgspec.field(default_factory=list)


class Page(msgspec.Struct, frozen=True):
    data: list[Conversation] = msgspec.field(default_factory=list)
    total_count: int | None = None


class Callback(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body Tavus posts to the callback URL (without ``webhook_url``, which only echoes it)."""

    conversation_id: str
    event_type: str
    properties: msgspec.Raw
    message_type: str | None = None
    timestamp: Any = None


def instant(value: Any) -> float | None:
    """Unix seconds from what Tavus writes for a time: ISO-8601, an HTTP date, or a number."""
    if isinstance(value, str) and value.strip() and not value.strip()[0].isdigit():
        try:
            return email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
    return epoch_seconds(value) if isinstance(value, int | float | str) else None


class TavusClient:
    def __init__(self, http: VendorHttp) -> None:
        self.http = http

    async def recent(self, since: float) -> AsyncIterator[Listed]:
        seen = 0
        for page in range(1, MAX_PAGES + 1):
            answer = await self.http.get("/v2/conversations", Page, {"limit": PAGE_SIZE, "page": page})
            older = 0
            for item in answer.data:
                started = instant(item.created_at)
                if started is not None and started < since:
                    older += 1
                    continue
                yield Listed(item.conversation_id, started, item.status == "ended")
            seen += len(answer.data)
            # Newest first: a page with nothing new enough ends the listing (so does the last page; the
            # API may answer fewer than asked per page, so the count decides, not the page's length).
            if not answer.data or older == len(answer.data):
                return
            if answer.total_count is not None and seen >= answer.total_count:
                return

    async def fetch(self, conversation_id: str) -> Fetched:
        path = f"/v2/conversations/{quote(conversation_id, safe='')}"
        conversation = await self.http.get(path, Conversation, {"verbose": "true"})
        bodies = [
            msgspec.json.encode(
                Callback(
                    conversation_id=conversation_id,
                    event_type=event.event_type,
                    properties=event.properties,
                    message_type=event.message_type,
                    timestamp=event.timestamp,
                )
            )
            for event in conversation.events
        ]
        return Fetched(conversation_id, bodies, conversation.status == "ended")


API = ApiClient(
    headers=lambda key: {"x-api-key": key},
    build=TavusClient,
    calls="1 list request per 100 conversations in the window, plus 1 per conversation fetched",
)
