"""``DELETE /conversations/{id}``: erase a conversation through the writer, then evict its cached pages.

The erasure is a job on the writer's own connection, between two commits (as retention is): it never
waits on a lock the writer holds, and it is ordered with the deliveries. What the writer committed
before it is erased; whatever it commits after finds the tombstone and is dropped. The cache prefix is
evicted once the erasure has committed, before the answer: a read after the answer finds nothing.
"""

from __future__ import annotations

import logging

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon.auth import check_bearer
from daemon.cache import PrefixTTLCache
from daemon.changes_signal import ChangesSignal
from daemon.errors import NotFound
from daemon.ids import path_id
from storage.errors import StorageUnavailable
from storage.surface import Surface
from storage.writer import Writer

log = logging.getLogger("transcriptd.erasure")


class Removed(msgspec.Struct):
    """How much of each kind went."""

    conversations: int
    messages: int
    events: int
    dead_letters: int
    cached_pages: int


class ErasedAnswer(msgspec.Struct, kw_only=True, tag_field="status", tag="erased"):
    """200: the conversation is erased, and a tombstone drops its later deliveries."""

    conversation_id: str
    removed: Removed
    deleted_at: float


class Eraser:
    def __init__(
        self, writer: Writer, surface: Surface, cache: PrefixTTLCache, token: str, changes: ChangesSignal
    ) -> None:
        self.writer = writer
        self.surface = surface
        self.changes = changes
        self.cache = cache
        self.token = token

    async def delete_conversation(self, request: Request) -> Response:
        check_bearer(request, self.token)
        cid = path_id(request)
        try:
            erased = await self.writer.run_job(lambda conn: self.surface.erasure.erase(conn, cid))
        except self.surface.driver_errors as exc:
            # Ours, not the client's: a 503 to retry (the transaction was rolled back, nothing went).
            raise StorageUnavailable(f"storage is unavailable: {exc}") from None
        if erased is None:
            raise NotFound(f"no conversation {cid!r}")
        # Committed: evict now, before answering (a commit's own eviction covers only deliveries).
        pages = self.cache.evict_prefix(("conv", cid))
        self.changes.publish(erased.position)
        log.info(
            "erased conversation %r: %d messages, %d events, %d dead letters, %d cached pages",
            cid,
            erased.messages,
            erased.events,
            erased.dead_letters,
            pages,
        )
        answer = ErasedAnswer(
            conversation_id=cid,
            removed=Removed(erased.conversations, erased.messages, erased.events, erased.dead_letters, pages),
            deleted_at=erased.deleted_at,
        )
        return Response(msgspec.json.encode(answer), media_type="application/json")
