"""``GET /search``: full-text search across every stored message (storage.search holds the query language).

Not cached: a search is one read of the index, and every commit would evict it anyway. A message whose
delivery was answered 200 is found by the next search: the index is written in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon.api import INSTANT, Source
from daemon.auth import check_bearer
from daemon.decoding import epoch_seconds, validation_problem
from daemon.errors import InvalidPayload, NotFound, Problem
from daemon.sources.model import Role
from storage.search import RANK_WINDOW, CursorError, QuerySyntaxError, SearchHit, SearchPage, SearchQuery
from storage.surface import Reads

MAX_SEARCH_PAGE = 100

Instant = Annotated[str, msgspec.Meta(pattern=INSTANT)]


class SearchParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    q: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            description='words (all required), "phrases", prefix* and -exclusions; case and accents ignored',
        ),
    ]
    source: Annotated[Source | None, msgspec.Meta(description="only messages of this source's stream")] = None
    role: Annotated[Role | None, msgspec.Meta(description="only messages of this role")] = None
    conversation_id: Annotated[str | None, msgspec.Meta(description="only messages of this conversation")] = None
    since: Annotated[
        Instant | None,
        msgspec.Meta(description="only messages at or after this (Unix seconds or ISO-8601, naive is UTC)"),
    ] = None
    until: Annotated[Instant | None, msgspec.Meta(description="only messages before this (same forms)")] = None
    include_system: Annotated[bool, msgspec.Meta(description="include system entries (prompts)")] = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEARCH_PAGE, description="hits per page")] = 20
    cursor: Annotated[str | None, msgspec.Meta(description="the `cursor` of the previous page's `next`")] = None


class SearchAnswer(msgspec.Struct):
    hits: list[SearchHit]
    next: Annotated[str | None, msgspec.Meta(description="the URL of the following page; null on the last")]
    partial: Annotated[
        bool, msgspec.Meta(description="the index is still being built: older messages may be missing")
    ] = False
    older_not_ranked: Annotated[
        bool,
        msgspec.Meta(
            description=f"more than {RANK_WINDOW} messages matched: the hits rank the newest {RANK_WINDOW} of them; "
            "narrow the query (a phrase, a filter, `until`) to reach older ones"
        ),
    ] = False


def search_query(params: Mapping[str, str]) -> SearchQuery:
    """A SearchQuery from query parameters (``SearchParams``); a bad one is InvalidPayload naming it. The
    syntax of ``q`` is checked by the search itself: see :func:`run`."""
    if "q" not in params:
        raise InvalidPayload([Problem("give what to search for in `q`", "query.q")])
    try:
        given = msgspec.convert(dict(params), SearchParams, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidPayload([validation_problem(exc, "query")]) from None
    return SearchQuery(
        text=given.q,
        source=given.source,
        role=given.role,
        conversation_id=given.conversation_id,
        since=_instant(given.since, "since"),
        until=_instant(given.until, "until"),
        include_system=given.include_system,
        limit=given.limit,
        cursor=given.cursor,
    )


async def run(reader: Reads, query: SearchQuery) -> SearchPage:
    """The search, with bad input (``q``'s syntax, a cursor not ours) as InvalidPayload naming the parameter."""
    try:
        return await reader.search(query)
    except QuerySyntaxError as exc:
        raise InvalidPayload([Problem(str(exc), "query.q")]) from None
    except CursorError as exc:
        raise InvalidPayload([Problem(str(exc), "query.cursor")]) from None


def _instant(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    seconds = epoch_seconds(text)
    if seconds is None:
        raise InvalidPayload([Problem("not a time: Unix seconds or ISO-8601 (naive is UTC)", f"query.{name}")])
    return seconds


class Search:
    def __init__(self, reader: Reads, token: str, *, enabled: bool = True) -> None:
        self.reader = reader
        self.token = token
        self.enabled = enabled

    async def search(self, request: Request) -> Response:
        check_bearer(request, self.token)
        if not self.enabled:
            raise NotFound("search is turned off (search.enabled = false)")
        params = dict(request.query_params)
        query = search_query(params)
        found = await run(self.reader, query)
        next_link = None
        if found.next is not None:
            next_link = "/search?" + urlencode({**params, "cursor": found.next})
        answer = SearchAnswer(found.hits, next_link, found.partial, found.older_not_ranked)
        return Response(msgspec.json.encode(answer), media_type="application/json")
