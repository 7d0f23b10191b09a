"""The change feed: ``GET /changes`` (a page after a position, long-polled on request) and
``GET /changes/stream`` (Server-Sent Events), both read from the outbox (storage.outbox).

Positions only grow, in commit order: the writer is the one process that writes at a time, and a
change gets its position inside the transaction that commits it. So a client that passes the ``next``
of each page as the ``after`` of the following one sees every change once, in position order, without
gaps. Positions are not contiguous (an erasure deletes a conversation's earlier changes).

Waiting is on the commit signal (daemon.changes_signal): a commit of this daemon wakes a long-poll at
once. A commit of another process (the CLI's replay, reconcile, delete) does not signal: the table is
read again every ``RECHECK_S`` while waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from daemon.api import MAX_INT64, parse_query
from daemon.auth import check_bearer
from daemon.changes_signal import ChangesSignal
from daemon.errors import InvalidPayload, Problem
from daemon.ids import quoted
from storage.surface import Reads

MAX_CHANGES = 1000
# The most `changes.max_wait_s` may be, and so the most `wait` may ask for.
MAX_WAIT_S = 3600
# While waiting, the table is read again this often: commits made by another process do not signal.
RECHECK_S = 2.0
# Changes a stream reads at a time.
STREAM_BATCH = 200


class ChangesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    after: Annotated[
        int, msgspec.Meta(ge=0, le=MAX_INT64, description="the position of the last change seen (0: from the start)")
    ] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHANGES, description="changes per page")] = 100
    wait: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=MAX_WAIT_S,
            description="seconds to wait for a change when there is none yet (long-poll); a longer wait than "
            "`changes.max_wait_s` waits that long",
        ),
    ] = 0.0


class StreamQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    after: Annotated[
        int,
        msgspec.Meta(ge=0, le=MAX_INT64, description="start after this position (a `Last-Event-ID` header wins)"),
    ] = 0


class Change(msgspec.Struct):
    position: int
    id: Annotated[str, msgspec.Meta(description="stable: the same change always has this id (`chg_<position>`)")]
    conversation_id: str
    source: str
    status: Annotated[str | None, msgspec.Meta(description="the conversation's status after the change; null: erased")]
    changed: Annotated[
        dict[str, int],
        msgspec.Meta(
            description="what changed, and how much: messages_added, messages_updated, created, status, recording, "
            "analysis, details, erased"
        ),
    ]
    first_seq: Annotated[int | None, msgspec.Meta(description="the smallest message position added or updated")]
    last_seq: Annotated[int | None, msgspec.Meta(description="the largest message position added or updated")]
    committed_at: float
    url: Annotated[str, msgspec.Meta(description="where to read the conversation")]


class ChangePage(msgspec.Struct):
    changes: list[Change]
    next: Annotated[int, msgspec.Meta(description="pass as `after` for the following page (`after` if none came)")]


_kinds = msgspec.json.Decoder(dict[str, int])


def change(row: tuple[Any, ...]) -> Change:
    position, cid, source, status, kinds, first_seq, last_seq, committed_at = row
    return Change(
        position=position,
        id=f"chg_{position}",
        conversation_id=cid,
        source=source,
        status=status,
        changed=_kinds.decode(kinds),
        first_seq=first_seq,
        last_seq=last_seq,
        committed_at=committed_at,
        url=f"/conversations/{quoted(cid)}",
    )


class Feed:
    def __init__(
        self, reader: Reads, signal: ChangesSignal, token: str, *, max_wait_s: float, heartbeat_s: float
    ) -> None:
        self.reader = reader
        self.signal = signal
        self.token = token
        self.max_wait_s = max_wait_s
        self.heartbeat_s = heartbeat_s

    async def list_changes(self, request: Request) -> Response:
        check_bearer(request, self.token)
        query = parse_query(request, ChangesQuery)
        changes = await self.changes_after(query.after, query.limit, min(query.wait, self.max_wait_s))
        page = ChangePage(changes, changes[-1].position if changes else query.after)
        return Response(msgspec.json.encode(page), media_type="application/json")

    async def changes_after(self, after: int, limit: int, wait: float) -> list[Change]:
        """The changes after ``after``; if none, waits up to ``wait`` seconds for some."""
        deadline = anyio.current_time() + wait
        while True:
            known = self.signal.latest  # before the read: a commit after it wakes the wait below
            rows = await self.reader.changes(after, limit)
            remaining = deadline - anyio.current_time()
            if rows or remaining <= 0 or self.signal.closed:
                return [change(row) for row in rows]
            # Past what was read, not only past `after`: positions the read did not find (pruned) must not
            # turn the wait into a spin.
            await self.signal.wait_beyond(max(after, known), min(remaining, RECHECK_S))

    async def stream(self, request: Request) -> Response:
        check_bearer(request, self.token)
        after = parse_query(request, StreamQuery).after
        resume = request.headers.get("last-event-id")
        if resume is not None:
            try:
                after = msgspec.convert({"after": resume.strip()}, StreamQuery, strict=False).after
            except msgspec.ValidationError:
                raise InvalidPayload([Problem("not a position this feed gave out", "header.Last-Event-ID")]) from None
        # Proxies must pass each event on as it comes, and keep none of them.
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            # The headers a GET would get, and no body: a stream served for a HEAD would never end (the
            # server drops its bytes, so nothing tells it the client went).
            return Response(media_type="text/event-stream", headers=headers)
        return StreamingResponse(self._events(after), media_type="text/event-stream", headers=headers)

    async def _events(self, after: int) -> AsyncIterator[bytes]:
        """Every change after ``after``, then each one as it commits, until the client goes (Starlette then
        cancels this) or the server stops (the signal closes)."""
        yield b"retry: 2000\n\n"
        heartbeat_at = anyio.current_time() + self.heartbeat_s
        while not self.signal.closed:
            known = self.signal.latest
            rows = await self.reader.changes(after, STREAM_BATCH)
            if rows:
                for row in rows:
                    data = msgspec.json.encode(change(row))
                    yield b"id: %d\nevent: change\ndata: %s\n\n" % (row[0], data)
                after = rows[-1][0]
                continue
            now = anyio.current_time()
            if now >= heartbeat_at:
                yield b": heartbeat\n\n"
                heartbeat_at = now + self.heartbeat_s
            await self.signal.wait_beyond(max(after, known), min(heartbeat_at - now, RECHECK_S))
