"""GET handlers: conversations and their messages, from the prefix-evicted cache or a read connection.

Every cached read of a conversation lives under the prefix ``("conv", conversation_id)``. The writer
evicts that prefix after each commit touching the conversation and before any ack, so a client that
reads after its webhook was answered sees its data.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon import metadata
from daemon.auth import check_bearer
from daemon.cache import PrefixTTLCache
from daemon.decoding import epoch_seconds, validation_problem
from daemon.errors import InvalidPayload, NotFound, Problem
from daemon.ids import path_id, quoted
from daemon.sources import NAMES
from daemon.sources.model import NORMAL_ROLES, Role
from storage.queries import Conversation, ConversationFilter, ConversationSummary, Message
from storage.surface import Reads

Q = TypeVar("Q", bound=msgspec.Struct)
T = TypeVar("T")

MAX_PAGE = 500
# SQLite binds integers as signed 64-bit: a larger cursor, or a page whose offset ((page - 1) x limit) would not
# fit, is a 422 naming the parameter rather than an OverflowError at bind time.
MAX_INT64 = 2**63 - 1
MAX_PAGE_NUMBER = MAX_INT64 // MAX_PAGE
# The streams intake writes: one per registered source.
Source = Annotated[
    str,
    msgspec.Meta(pattern=f"^(?:{'|'.join(NAMES)})$", extra_json_schema={"enum": list(NAMES)}),
]
Status = Literal["active", "ended", "failed"]
METADATA_PREFIX = "metadata."
MAX_METADATA_FILTERS = 8
# Unix seconds, or an ISO-8601 date and time: in the OpenAPI description too (epoch_seconds reads it).
INSTANT = (
    r"^-?[0-9]+(\.[0-9]+)?$"
    r"|^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?(Z|[+-][0-9]{2}:[0-9]{2})?$"
)


class ConversationsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE, description="conversations per page")] = 50
    cursor: Annotated[str | None, msgspec.Meta(description="the `next` cursor of the previous page")] = None
    status: Annotated[Status | None, msgspec.Meta(description="only conversations `active` or `ended`")] = None
    source: Annotated[Source | None, msgspec.Meta(description="only conversations of this source")] = None
    updated_since: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=INSTANT,
                description="only conversations updated at or after this (Unix seconds or ISO-8601, naive is UTC)",
            ),
        ]
        | None
    ) = None
    # And any number (up to MAX_METADATA_FILTERS) of `metadata.<key>=<value>`: see conversation_filter.


class MessagesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE, description="messages per page")] = 50
    page: (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_NUMBER, description="1-based page number (not with `after`)")]
        | None
    ) = None
    after: (
        Annotated[
            int, msgspec.Meta(ge=-1, le=MAX_INT64, description="cursor: messages after this position (not with `page`)")
        ]
        | None
    ) = None
    role: Annotated[Role | None, msgspec.Meta(description="only messages of this role")] = None
    include_system: Annotated[bool, msgspec.Meta(description="include system entries (prompts)")] = False
    source: Annotated[
        Source | None, msgspec.Meta(description="which source's stream (default: the conversation's own)")
    ] = None


class ConversationPage(msgspec.Struct):
    conversations: list[ConversationSummary]
    next: str | None


class MessagePage(msgspec.Struct):
    conversation_id: str
    source: str
    limit: int
    page: int | None
    after: int | None
    messages: list[Message]
    next: str | None


def parse_query(request: Request, type_: type[Q]) -> Q:
    return parse_query_params(dict(request.query_params), type_)


def parse_query_params(params: dict[str, str], type_: type[Q]) -> Q:
    try:
        return msgspec.convert(params, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidPayload([validation_problem(exc, "query")]) from None


class Api:
    def __init__(self, reader: Reads, cache: PrefixTTLCache, token: str) -> None:
        self.reader = reader
        self.cache = cache
        self.token = token

    async def list_conversations(self, request: Request) -> Response:
        check_bearer(request, self.token)
        return _json(await self.conversation_page(dict(request.query_params)))

    async def conversation_page(self, params: dict[str, str]) -> ConversationPage:
        """A page of the list for these query parameters (the JSON API's and the viewer's)."""
        params = dict(params)
        wanted = {key: params.pop(key) for key in list(params) if key.startswith(METADATA_PREFIX)}
        query = parse_query_params(params, ConversationsQuery)
        where = conversation_filter(query, wanted)
        before = _decode_cursor(query.cursor) if query.cursor else None
        rows = await self.reader.conversations(query.limit + 1, before, where)
        next_link = None
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            last = rows[-1]
            # The filters go on in the next page's URL: a client follows `next` and gets the same selection.
            carried = {name: getattr(query, name) for name in ("status", "source", "updated_since")}
            following = {"limit": query.limit, "cursor": _encode_cursor(last)}
            following |= {name: value for name, value in carried.items() if value is not None} | wanted
            next_link = "/conversations?" + urlencode(following)
        # Not cached: every commit changes this list, so it would only ever be evicted.
        return ConversationPage(rows, next_link)

    async def get_conversation(self, request: Request) -> Response:
        check_bearer(request, self.token)
        conversation = await self.conversation(path_id(request))
        return _json(conversation)

    async def list_messages(self, request: Request) -> Response:
        check_bearer(request, self.token)
        conversation = await self.conversation(path_id(request))
        body = await self.message_page(conversation, parse_query(request, MessagesQuery))
        return Response(body, media_type="application/json")

    async def message_page(self, conversation: Conversation, query: MessagesQuery) -> bytes:
        """A page of messages as JSON (a :class:`MessagePage`), from the cache or the database."""
        if query.page is not None and query.after is not None:
            raise InvalidPayload([Problem("give either `page` or `after`, not both", "query.after")])
        source = query.source or conversation.source
        if query.role is not None and query.role not in NORMAL_ROLES:
            await self._check_role(conversation.id, query.role)
        key = ("conv", conversation.id, "messages", source, query.page, query.after, query.limit, query.role)
        return await self._cached((*key, query.include_system), lambda: self._message_page(conversation, source, query))

    async def _check_role(self, cid: str, role: str) -> None:
        """A role outside the normalised four filters only if some message of the conversation has it (the
        generic endpoint and Tavus store a sender's own role as it came): a typo is a 422, not an empty page."""
        if not await self._cached(("conv", cid, "has_role", role), lambda: self.reader.has_role(cid, role)):
            roles = ", ".join(sorted(NORMAL_ROLES))
            raise InvalidPayload(
                [Problem(f"no message of this conversation has the role {role!r}; the roles are {roles}", "query.role")]
            )

    async def conversation(self, cid: str) -> Conversation:
        """The conversation's record, from the cache or the database; 404 if nothing of it is stored."""
        conversation = await self._cached(("conv", cid, "record"), lambda: self.reader.conversation(cid))
        if conversation is None:
            raise NotFound(f"no conversation {cid!r}")
        return conversation

    async def _message_page(self, conversation: Conversation, source: str, query: MessagesQuery) -> bytes:
        page = query.page or 1
        rows = await self.reader.messages(
            conversation.id,
            source=source,
            limit=query.limit + 1,
            after=query.after,
            offset=0 if query.after is not None else (page - 1) * query.limit,
            role=query.role,
            include_system=query.include_system,
        )
        next_link = None
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            params: dict[str, Any] = {"limit": query.limit}
            if query.after is not None:
                params["after"] = rows[-1].seq
            else:
                params["page"] = page + 1
            if query.role is not None:
                params["role"] = query.role
            if query.include_system:
                params["include_system"] = "true"
            if query.source is not None:
                params["source"] = query.source
            next_link = f"/conversations/{quoted(conversation.id)}/messages?{urlencode(params)}"
        result = MessagePage(
            conversation_id=conversation.id,
            source=source,
            limit=query.limit,
            page=None if query.after is not None else page,
            after=query.after,
            messages=rows,
            next=next_link,
        )
        return msgspec.json.encode(result)

    async def _cached(self, key: tuple[Hashable, ...], load: Callable[[], Awaitable[T]]) -> T:
        if self.reader.shared:
            return await self._revision_checked(key, load)
        hit = self.cache.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        # Read the generation before the database: if a commit evicts this conversation while we read,
        # our (older) result is not stored.
        generation = self.cache.generation(key[:2])
        value = await load()
        if value is not None:
            self.cache.store(key, value, generation)
        return value

    async def _revision_checked(self, key: tuple[Hashable, ...], load: Callable[[], Awaitable[T]]) -> T:
        """The cache on a database other replicas write too: their commits evict nothing here, so a page
        is served only while the conversation's ``rev`` (bumped by every write transaction that touches
        it, on any replica) is the one it was cached at. One primary-key lookup per read: a client that got
        its 200 from another replica reads its own write here at once."""
        cid = str(key[1])
        rev = await self.reader.rev(cid)
        hit = self.cache.get(key)
        if hit is not None and hit[0] == rev:
            return hit[1]  # type: ignore[no-any-return]
        # The rev is read before the page: a write committed in between makes the stored page newer
        # than its tag, never older, so the worst case is one needless reload.
        generation = self.cache.generation(key[:2])
        value = await load()
        if value is not None:
            self.cache.store(key, (rev, value), generation)
        return value


def conversation_filter(query: ConversationsQuery, wanted: dict[str, str]) -> ConversationFilter:
    """The list's filter: ``updated_since`` read as a time, each ``metadata.<key>`` checked; a bad one is a
    422 naming its parameter."""
    since = None
    if query.updated_since is not None:
        since = epoch_seconds(query.updated_since)
        if since is None:
            problem = Problem("not a time: Unix seconds or ISO-8601 (naive is UTC)", "query.updated_since")
            raise InvalidPayload([problem])
    if len(wanted) > MAX_METADATA_FILTERS:
        raise InvalidPayload([Problem(f"at most {MAX_METADATA_FILTERS} metadata filters", "query.metadata")])
    for name in wanted:
        key = name.removeprefix(METADATA_PREFIX)
        if not metadata.KEY.fullmatch(key):
            problem = Problem("a metadata key is 1-64 characters of letters, digits and _.:-", f"query.{name[:80]}")
            raise InvalidPayload([problem])
    pairs = tuple((name.removeprefix(METADATA_PREFIX), value) for name, value in wanted.items())
    return ConversationFilter(status=query.status, source=query.source, updated_since=since, metadata=pairs)


def _json(payload: msgspec.Struct) -> Response:
    return Response(msgspec.json.encode(payload), media_type="application/json")


def _encode_cursor(last: ConversationSummary) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([last.updated_at, last.id])).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        updated_at, cid = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()), type=tuple[float, str])
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidPayload([Problem("not a cursor this API gave out", "query.cursor")]) from None
    return updated_at, cid
