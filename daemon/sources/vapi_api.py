"""Vapi's API, for reconcile: list recent calls, and fetch one as the end-of-call report it would have sent.

``GET /call/{id}`` returns the Call (VapiAI/server-sdk-python ``types/call.py``): ``status``,
``endedReason``, ``startedAt``, ``endedAt``, ``analysis`` and ``artifact`` (``messages``, recording URLs)
are what the ``end-of-call-report`` server message carries, so an ended call becomes that message again,
parsed by ``vapi.parse`` under the key the webhook has (``vapi:<call id>:end-of-call-report``): the late
report is a duplicate. A call not ended yet gives nothing to store. ``GET /call?limit=&createdAtGe=&createdAtLe=``
lists calls, a JSON array, newest first, without a cursor: the next page ends at the oldest
``createdAt`` seen, and the listing ends with a page that brings no new call (one request more than the
pages, since the API may answer fewer than asked). Auth: ``Authorization: Bearer <private key>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import quote

import msgspec

from daemon.decoding import epoch_seconds
from daemon.sources.model import ApiClient, Fetched, Listed
from daemon.vendor_http import VendorHttp

PAGE_SIZE = 100
MAX_PAGES = 1000  # a bound on one listing


def _null() -> msgspec.Raw:
    return msgspec.Raw(b"null")


class Call(msgspec.Struct, frozen=True, rename="camel"):
    id: str
    status: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    ended_reason: str | None = None
    analysis: msgspec.Raw = msgspec.field(default_factory=_null)
    artifact: msgspec.Raw = msgspec.field(default_factory=_null)
    messages: msgspec.Raw = msgspec.field(default_factory=_null)  # deprecated: artifact.messages


class CallRef(msgspec.Struct, frozen=True):
    id: str


class Report(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """``message`` of an ``end-of-call-report`` server message, as Vapi posts it."""

    type: str
    call: CallRef
    ended_reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: msgspec.Raw | None = None
    artifact: msgspec.Raw | None = None


class ServerMessage(msgspec.Struct, frozen=True):
    message: Report


def _given(raw: msgspec.Raw) -> msgspec.Raw | None:
    return None if bytes(raw) == b"null" else raw


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VapiClient:
    def __init__(self, http: VendorHttp) -> None:
        self.http = http

    async def recent(self, since: float) -> AsyncIterator[Listed]:
        seen: set[str] = set()
        before: str | None = None
        for _ in range(MAX_PAGES):
            params = {"limit": PAGE_SIZE, "createdAtGe": _iso(since), "createdAtLe": before}
            calls = await self.http.get("/call", list[Call], params)
            fresh = [call for call in calls if call.id not in seen]
            for call in fresh:
                seen.add(call.id)
                yield Listed(call.id, epoch_seconds(call.created_at), call.status == "ended")
            # No cursor: the next page ends at the oldest call of this one (inclusive, so calls created in
            # the same millisecond are not skipped; the ones seen are not listed twice). The API may answer
            # fewer than asked, so only a page with nothing new ends the listing.
            stamps = [call.created_at for call in calls if call.created_at]
            if not fresh or not stamps:
                return
            before = min(stamps, key=lambda stamp: epoch_seconds(stamp) or 0.0)

    async def fetch(self, conversation_id: str) -> Fetched:
        call = await self.http.get(f"/call/{quote(conversation_id, safe='')}", Call)
        if call.status != "ended":
            return Fetched(conversation_id, [], ended=False)
        artifact = _given(call.artifact)
        if artifact is None and _given(call.messages) is not None:
            artifact = msgspec.Raw(b'{"messages":' + bytes(call.messages) + b"}")
        report = Report(
            type="end-of-call-report",
            call=CallRef(conversation_id),
            ended_reason=call.ended_reason,
            started_at=call.started_at,
            ended_at=call.ended_at,
            analysis=_given(call.analysis),
            artifact=artifact,
        )
        return Fetched(conversation_id, [msgspec.json.encode(ServerMessage(report))], ended=True)


API = ApiClient(
    headers=lambda key: {"authorization": f"Bearer {key}"},
    build=VapiClient,
    calls="1 list request per 100 calls in the window and 1 more, plus 1 per call fetched",
)
