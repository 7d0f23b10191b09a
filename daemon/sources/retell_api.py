"""Retell's API, for reconcile: list recent calls, and fetch one as the webhooks it would have sent.

``GET /v2/get-call/{call_id}`` returns the call object the webhooks carry (RetellAI/retell-python-sdk
``types/call_response.py``): an ended call becomes ``call_ended`` (the call without ``call_analysis``, as
Retell sends it) and, once analysed, ``call_analyzed`` (the whole call), each parsed by ``retell.parse``
under the webhook's own key (``retell:<event>:<call id>``): the late webhook is a duplicate.
``POST /v3/list-calls`` (``filter_criteria.start_timestamp``, ``sort_order``, ``limit``,
``pagination_key``) answers ``{"items": [...], "has_more", "pagination_key"}``. Auth: ``Authorization:
Bearer <api key>``, the same key that signs the webhooks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import msgspec

from daemon.sources.model import ApiClient, Fetched, Listed
from daemon.vendor_http import VendorHttp

PAGE_SIZE = 100
MAX_PAGES = 1000  # a bound on one listing
# The call will not change any more: ended (analysed, or never to be), or never connected.
_DONE = frozenset({"not_connected", "error"})


class Item(msgspec.Struct, frozen=True):
    call_id: str
    call_status: str | None = None
    start_timestamp: float | None = None  # Unix ms


class Page(msgspec.Struct, frozen=True):
    items: list[Item] = msgspec.field(default_factory=list)
    has_more: bool = False
    pagination_key: str | None = None


class Webhook(msgspec.Struct, frozen=True):
    event: str
    call: dict[str, Any]


class RetellClient:
    def __init__(self, http: VendorHttp) -> None:
        self.http = http

    async def recent(self, since: float) -> AsyncIterator[Listed]:
        body: dict[str, Any] = {
            "filter_criteria": {"start_timestamp": {"op": "ge", "type": "number", "value": int(since * 1000)}},
            "sort_order": "descending",
            "limit": PAGE_SIZE,
        }
        for _ in range(MAX_PAGES):
            page = await self.http.post("/v3/list-calls", Page, body)
            for item in page.items:
                started = None if item.start_timestamp is None else item.start_timestamp / 1000
                yield Listed(item.call_id, started, item.call_status in ("ended", *_DONE))
            if not page.has_more or not page.pagination_key or not page.items:
                return
            body = {**body, "pagination_key": page.pagination_key}

    async def fetch(self, conversation_id: str) -> Fetched:
        call = await self.http.get(f"/v2/get-call/{quote(conversation_id, safe='')}", dict[str, Any])
        status = call.get("call_status")
        if status not in ("ended", *_DONE):
            return Fetched(conversation_id, [], ended=False)
        ended = {name: value for name, value in call.items() if name != "call_analysis"}
        bodies = [msgspec.json.encode(Webhook("call_ended", ended))]
        analysed = call.get("call_analysis") is not None
        if analysed:
            bodies.append(msgspec.json.encode(Webhook("call_analyzed", call)))
        # An ended call is analysed shortly after: until then there is more to fetch.
        return Fetched(conversation_id, bodies, ended=analysed or status in _DONE)


def _headers(setting: str) -> dict[str, str]:
    # webhooks.retell.api_key may hold two keys during a rotation: the first is the current one.
    return {"authorization": f"Bearer {setting.split()[0]}"}


API = ApiClient(
    headers=_headers,
    build=RetellClient,
    calls="1 list request per 100 calls in the window, plus 1 per call fetched",
)
