"""``GET /conversations/{id}/events``: a conversation's delivery timeline, from ``events`` and ``dead_letters``.

It answers "what did the vendor send us for this call, and what became of it?". Each entry's ``outcome``:
``stored`` (the delivery was stored whole), ``partial`` (stored, but its answer was a 422 naming ``problems``
fields: the raw event and every valid message were kept), ``failed`` (the database refused it: it waits in
``dead_letters``, unresolved, for ``transcriptd dead-letters retry``). Deliveries refused with a 4xx before
anything was stored are not here: the delivery log has them.

The raw body comes only with ``include_body=true``, masked as the logs are: Tavus echoes its callback URL,
webhook token included, in ``webhook_url``, whose value is replaced by ``[redacted]``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon.api import MAX_INT64, MAX_PAGE, parse_query
from daemon.auth import check_bearer
from daemon.errors import InvalidPayload, NotFound, Problem
from daemon.ids import path_id, quoted
from daemon.logs import RedactSecrets
from storage.surface import Reads

Outcome = Literal["stored", "partial", "failed"]
_DEAD_LETTER = 1


class EventsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE, description="entries per page")] = 50
    cursor: Annotated[str | None, msgspec.Meta(description="the `next` cursor of the previous page")] = None
    include_body: Annotated[
        bool, msgspec.Meta(description="add each raw body, as text, with the callback URL's secret masked")
    ] = False


class TimelineEntry(msgspec.Struct, omit_defaults=True):
    event_type: str
    source: str
    received_at: Annotated[float, msgspec.Meta(description="Unix seconds; of the latest attempt for `failed`")]
    delivery_key: Annotated[str, msgspec.Meta(description="the idempotency key: webhook-id, else a body hash")]
    outcome: Annotated[Outcome, msgspec.Meta(description="stored | partial (answered 422, valid part kept) | failed")]
    size: Annotated[int, msgspec.Meta(description="the raw body's size in bytes")]
    problems: Annotated[int, msgspec.Meta(description="`partial`: how many problems the 422 answer named")] = 0
    error: Annotated[str | None, msgspec.Meta(description="`failed`: why the database refused it")] = None
    attempts: Annotated[int | None, msgspec.Meta(description="`failed`: deliveries of it refused so far")] = None
    body: Annotated[str | None, msgspec.Meta(description="with `include_body=true`: the raw body, masked")] = None


class EventPage(msgspec.Struct):
    conversation_id: str
    events: list[TimelineEntry]
    next: str | None


# (received_at, kind, id) of the last entry of a page; the id bounded so that SQLite can bind it.
_Cursor = tuple[float, Literal[0, 1], Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]]


class Timeline:
    def __init__(self, reader: Reads, token: str, mask: RedactSecrets) -> None:
        self.reader = reader
        self.token = token
        self.mask = mask

    async def list_events(self, request: Request) -> Response:
        check_bearer(request, self.token)
        cid = path_id(request)
        query = parse_query(request, EventsQuery)
        rows, cursor = await self.rows(cid, query)
        next_link = None
        if cursor is not None:
            params: dict[str, Any] = {"limit": query.limit, "cursor": cursor}
            if query.include_body:
                params["include_body"] = "true"
            next_link = f"/conversations/{quoted(cid)}/events?{urlencode(params)}"
        page = EventPage(cid, [entry for _, _, entry in rows], next_link)
        # Not cached: it is an audit view, read rarely, and every delivery of the conversation changes it.
        return Response(msgspec.json.encode(page), media_type="application/json")

    async def rows(self, cid: str, query: EventsQuery) -> tuple[list[tuple[int, int, TimelineEntry]], str | None]:
        """One page of the timeline as (kind: 0 event, 1 dead letter, row id, entry), and the next page's cursor."""
        after = _decode_cursor(query.cursor) if query.cursor else None
        rows = await self.reader.timeline(cid, limit=query.limit + 1, after=after, bodies=query.include_body)
        if not rows and after is None:
            raise NotFound(f"no deliveries of conversation {cid!r}")
        cursor = None
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            cursor = _encode_cursor(rows[-1])
        return [(row[0], row[1], self._entry(row)) for row in rows], cursor

    async def body(self, cid: str, kind: int, row_id: int) -> str:
        """One entry's raw body as text, masked as the timeline masks it."""
        body = await self.reader.event_body(cid, kind, row_id)
        if body is None:
            raise NotFound(f"no such delivery of conversation {cid!r}")
        return self.mask.redact(body.decode("utf-8", "replace"))

    def _entry(self, row: tuple[Any, ...]) -> TimelineEntry:
        kind, _, event_type, source, received_at, key, size, problems, error, attempts, body = row
        outcome: Outcome = "failed" if kind == _DEAD_LETTER else "partial" if problems else "stored"
        return TimelineEntry(
            event_type=event_type,
            source=source,
            received_at=received_at,
            delivery_key=key,
            outcome=outcome,
            size=size,
            problems=problems,
            error=error,
            attempts=attempts,
            # Invalid UTF-8 in a field intake ignores is kept raw in the database; shown here as U+FFFD.
            body=None if body is None else self.mask.redact(bytes(body).decode("utf-8", "replace")),
        )


def _encode_cursor(row: tuple[Any, ...]) -> str:
    kind, row_id, _, _, received_at = row[:5]
    return base64.urlsafe_b64encode(msgspec.json.encode([received_at, kind, row_id])).decode()


def _decode_cursor(cursor: str) -> tuple[float, int, int]:
    try:
        decoded: tuple[float, int, int] = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()), type=_Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidPayload([Problem("not a cursor this API gave out", "query.cursor")]) from None
    return decoded
