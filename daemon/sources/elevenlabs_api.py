"""ElevenLabs' API, for reconcile: list recent conversations, and fetch one as its post-call webhook.

``GET /v1/convai/conversations/{id}`` returns the conversation in the model the
``post_call_transcription`` webhook carries as ``data`` (elevenlabs/elevenlabs-python
``types/get_conversation_response_model.py``): a conversation that is ``done`` becomes that webhook
again, parsed by ``elevenlabs.parse``. Its ``event_timestamp`` is unknown, so the fetch is kept under
a key of its own and the late webhook adds an event row but no message. ``GET /v1/convai/conversations``
(``call_start_after_unix``, ``page_size`` at most 100, ``cursor``) answers ``{"conversations": [...],
"has_more", "next_cursor"}``. Auth: ``xi-api-key``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import msgspec

from daemon.sources.model import ApiClient, Fetched, Listed
from daemon.vendor_http import VendorHttp

PAGE_SIZE = 100  # the API's most
MAX_PAGES = 1000  # a bound on one listing
# initiated, in-progress, processing: still changing; done and failed: final.
_FINAL = frozenset({"done", "failed"})


class Summary(msgspec.Struct, frozen=True):
    conversation_id: str
    status: str | None = None
    start_time_unix_secs: float | None = None


class Page(msgspec.Struct, frozen=True):
    conversations: list[Summary] = msgspec.field(default_factory=list)
    has_more: bool = False
    next_cursor: str | None = None


class Status(msgspec.Struct, frozen=True):
    status: str | None = None


class Webhook(msgspec.Struct, frozen=True):
    type: str
    data: msgspec.Raw


class ElevenLabsClient:
    def __init__(self, http: VendorHttp) -> None:
        self.http = http

    async def recent(self, since: float) -> AsyncIterator[Listed]:
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params = {"call_start_after_unix": int(since), "page_size": PAGE_SIZE, "cursor": cursor}
            page = await self.http.get("/v1/convai/conversations", Page, params)
            for item in page.conversations:
                yield Listed(item.conversation_id, item.start_time_unix_secs, item.status in _FINAL)
            if not page.has_more or not page.next_cursor or not page.conversations:
                return
            cursor = page.next_cursor

    async def fetch(self, conversation_id: str) -> Fetched:
        path = f"/v1/convai/conversations/{quote(conversation_id, safe='')}"
        raw = await self.http.get(path, msgspec.Raw)
        status = self.http.decode(bytes(raw), Status, f"GET {path}").status
        if status != "done":
            return Fetched(conversation_id, [], ended=status in _FINAL)
        body = msgspec.json.encode(Webhook("post_call_transcription", raw))
        return Fetched(conversation_id, [body], ended=True)


API = ApiClient(
    headers=lambda key: {"xi-api-key": key},
    build=ElevenLabsClient,
    calls="1 list request per 100 conversations in the window, plus 1 per conversation fetched",
)
