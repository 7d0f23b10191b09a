"""Reads for the API, on read-only connections of their own: WAL readers never wait for the writer."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import msgspec

from storage import search as fts
from storage.connection import open_reader
from storage.statements import PATCH_COLUMNS


class Message(msgspec.Struct, omit_defaults=True):
    seq: int
    role: str
    content: str
    source: str
    timestamp: float | None = None
    seconds_from_start: float | None = None
    duration: float | None = None
    inference_id: str | None = None
    id: str | None = None  # the client's own id, on the generic endpoint
    vendor_role: str | None = None  # the role as the vendor wrote it, where the normalised one differs


class PostCallAction(msgspec.Struct):
    tool_name: str | None
    status: str | None
    request: Any
    response: Any
    received_at: float


class Recording(msgspec.Struct, omit_defaults=True):
    uri: str | None = None
    provider: str | None = None
    duration: float | None = None
    error: str | None = None


class ConversationSummary(msgspec.Struct):
    id: str
    source: str
    status: str
    message_count: int
    started_at: float | None
    ended_at: float | None
    last_message_at: float | None
    updated_at: float
    metadata: dict[str, str] = {}  # the callback URL's query parameters, merged across deliveries


@dataclass(frozen=True, slots=True)
class ConversationFilter:
    """What ``GET /conversations`` keeps: every given condition holds (None: any)."""

    status: str | None = None
    source: str | None = None
    updated_since: float | None = None  # Unix seconds, inclusive
    metadata: tuple[tuple[str, str], ...] = ()  # (key, value) pairs, each equal


class Conversation(msgspec.Struct):
    id: str
    source: str
    status: str
    replica_id: str | None
    shutdown_reason: str | None
    started_at: float | None
    ended_at: float | None
    message_count: Annotated[
        int, msgspec.Meta(description="every message stored, of every stream, system entries (prompts) included")
    ]
    message_count_without_system: Annotated[
        int,
        msgspec.Meta(description="the same without system entries: what the messages list shows unless include_system"),
    ]
    last_message_at: float | None
    recording: Recording
    perception_analysis: str | None
    perception_unavailable_reason: str | None
    post_call_actions: list[PostCallAction]
    created_at: float
    updated_at: float
    end_reason: str | None = None  # the vendor's reason the call ended (or failed to connect)
    analysis: Any = None  # the vendor's analysis as it sent it: summary, success, structured data
    metadata: dict[str, str] = {}


class _PostCallEvent(msgspec.Struct):
    properties: dict[str, Any] = {}


CONVERSATION_COLUMNS = (
    "id",
    "source",
    "status",
    "message_count",
    "last_message_at",
    *PATCH_COLUMNS,
    "created_at",
    "updated_at",
    "metadata",
)
SUMMARY_COLUMNS = "id, source, status, message_count, started_at, ended_at, last_message_at, updated_at, metadata"


class Reader:
    """A few read-only connections (each in aiosqlite's thread), used in turn."""

    # One process writes this database: its cache is evicted in-process on commit, so no rev() check.
    shared: bool = False

    def __init__(self, path: str | Path, *, connections: int = 2) -> None:
        self.path = path
        self._count = connections
        self._connections: list[aiosqlite.Connection] = []
        self._turn: Iterator[aiosqlite.Connection] = iter(())
        self._stack = AsyncExitStack()

    async def open(self) -> None:
        for _ in range(self._count):
            conn = aiosqlite.Connection(functools.partial(open_reader, self.path), iter_chunk_size=256)
            self._connections.append(await self._stack.enter_async_context(conn))
        self._turn = itertools.cycle(self._connections)

    async def close(self) -> None:
        await self._stack.aclose()
        self._connections.clear()

    async def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = next(self._turn)
        async with conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def rev(self, conversation_id: str) -> int | None:
        """None: SQLite keeps no revision; storage.postgres.queries.Reader.rev has the shared database's."""
        return None

    async def conversation(self, conversation_id: str) -> Conversation | None:
        rows = await self._all(
            f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations WHERE id = ?",  # noqa: S608
            (conversation_id,),
        )
        if not rows:
            return None
        actions = await self.post_call_actions(conversation_id)
        ((without_system,),) = await self._all(
            "SELECT count(*) FROM messages WHERE conversation_id = ? AND role != 'system'", (conversation_id,)
        )
        return conversation_from_row(rows[0], actions, without_system)

    async def post_call_actions(self, conversation_id: str) -> list[PostCallAction]:
        """From the raw events: they are kept there as Tavus sent them, in arrival order."""
        rows = await self._all(
            "SELECT body, received_at FROM events WHERE conversation_id = ? "
            "AND event_type = 'application.post_call_action_executed' ORDER BY id",
            (conversation_id,),
        )
        return post_call_actions_from(rows)

    async def conversations(
        self, limit: int, before: tuple[float, str] | None, where: ConversationFilter | None = None
    ) -> list[ConversationSummary]:
        """Newest activity first; ``before`` is the (updated_at, id) of the last one already seen; ``where``
        keeps only the conversations that match it."""
        where = where or ConversationFilter()
        conditions: list[str] = []
        params: list[Any] = []
        if before is not None:
            conditions.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
            params += [before[0], before[0], before[1]]
        filtered, values = filter_conditions(where, "?")
        conditions += filtered
        params += values
        for key, value in where.metadata:
            # The key is quoted as a JSON path member; daemon.metadata allows no quote or backslash in it.
            conditions.append("json_extract(metadata, ?) = ?")
            params += [f'$."{key}"', value]
        clause = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        # Assembled from the constant fragments above; values are all parameters.
        rows = await self._all(
            f"SELECT {SUMMARY_COLUMNS} FROM conversations {clause}ORDER BY updated_at DESC, id DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        return [_summary(row) for row in rows]

    async def has_role(self, conversation_id: str, role: str) -> bool:
        rows = await self._all(
            "SELECT 1 FROM messages WHERE conversation_id = ? AND role = ? LIMIT 1", (conversation_id, role)
        )
        return bool(rows)

    async def messages(
        self,
        conversation_id: str,
        *,
        source: str,
        limit: int,
        after: int | None = None,
        offset: int = 0,
        role: str | None = None,
        include_system: bool = False,
    ) -> list[Message]:
        """One stream's messages by position: after a ``seq`` (cursor) or from an ``offset`` (page)."""
        where, params = message_conditions(
            "?", conversation_id, source=source, after=after, role=role, include_system=include_system
        )
        params += [limit, offset]
        # The WHERE clause is assembled from the constant fragments above; values are all parameters.
        rows = await self._all(
            "SELECT seq, role, content, source, timestamp, seconds_from_start, duration, inference_id, external_id,"  # noqa: S608
            " vendor_role "
            f"FROM messages WHERE {' AND '.join(where)} ORDER BY seq LIMIT ? OFFSET ?",
            tuple(params),
        )
        return [Message(*row) for row in rows]

    async def changes(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Rows of :data:`CHANGES` after position ``after``, in position order."""
        return await self._all(CHANGES, (after, limit))

    async def search(self, query: fts.SearchQuery) -> fts.SearchPage:
        """One page of full-text hits (storage.search); QuerySyntaxError or CursorError for bad input."""
        for text in (query.text, query.source, query.role, query.conversation_id):
            fts.check_text(text)
        expression = fts.fts_expression(fts.parse(query.text))
        cursor = None if query.cursor is None else fts.decode_cursor(query.cursor)
        if cursor is not None:
            low, high, older = cursor.low, cursor.high, cursor.older
        else:
            ((first, last),) = await self._all(*fts.bounds(query).astuple())
            low, high = fts.MIN_ID if first is None else first, fts.MIN_ID if last is None else last
            left_out = await self._all(*fts.window(query, expression, low, high).astuple())
            older = bool(left_out)
            if left_out:
                low = left_out[0][0] + 1
        ranked = await self._all(*fts.candidates(query, expression, cursor, low, high).astuple())
        partial = bool(await self._all("SELECT 1 FROM search_backfill WHERE id = 1", ()))
        rows = []
        if ranked:
            rows = await self._all(*fts.details(expression, [r[0] for r in ranked[: query.limit]]).astuple())
        offset = 0 if cursor is None else cursor.offset
        ranks = [(r[0], r[1]) for r in ranked]
        return fts.page(query, offset, ranks, rows, low=low, high=high, older=older, partial=partial)

    async def timeline(
        self, conversation_id: str, *, limit: int, after: tuple[float, int, int] | None, bodies: bool
    ) -> list[tuple[Any, ...]]:
        """Rows of :data:`TIMELINE`: (kind: 0 event, 1 dead letter, id, event_type, source, received_at,
        delivery_key, size, problems, error, attempts, body or None)."""
        cursor = after or (None, None, None)
        return await self._all(TIMELINE, (conversation_id, limit, bodies, *cursor))

    async def event_body(self, conversation_id: str, kind: int, row_id: int) -> bytes | None:
        """The raw body of one timeline entry (kind 0: ``events``, 1: ``dead_letters``), None if not stored."""
        table = "dead_letters" if kind else "events"
        rows = await self._all(
            f"SELECT body FROM {table} WHERE id = ? AND conversation_id = ?",  # noqa: S608 (one of two names)
            (row_id, conversation_id),
        )
        return bytes(rows[0][0]) if rows else None


# The outbox (storage.outbox), by position: the change feed's page.
CHANGES = """
SELECT position, conversation_id, source, status, kinds, first_seq, last_seq, committed_at
FROM changes WHERE position > ? ORDER BY position LIMIT ?
"""

# A conversation's delivery timeline: its stored events, and the deliveries the database refused and that are
# still unresolved in dead_letters, in the order they arrived. Bodies are read only when asked for (length()
# of a BLOB does not read it). ?4 is the (received_at, kind, id) of the last row already seen, or NULL.
TIMELINE = """
SELECT kind, id, event_type, source, received_at, delivery_key, size, problems, error, attempts, body FROM (
    SELECT 0 AS kind, id, event_type, source, received_at, delivery_key, length(body) AS size, problems,
           NULL AS error, NULL AS attempts, CASE WHEN ?3 THEN body END AS body
    FROM events WHERE conversation_id = ?1
    UNION ALL
    SELECT 1, id, event_type, source, received_at, delivery_key, length(body), 0, error, attempts,
           CASE WHEN ?3 THEN body END
    FROM dead_letters WHERE conversation_id = ?1 AND resolved_at IS NULL
)
WHERE ?4 IS NULL OR (received_at, kind, id) > (?4, ?5, ?6)
ORDER BY received_at, kind, id LIMIT ?2
"""


def conversation_from_row(
    row: tuple[Any, ...], post_call_actions: list[PostCallAction], without_system: int
) -> Conversation:
    """A row of :data:`CONVERSATION_COLUMNS` (either backend's), with what is read beside it."""
    record = dict(zip(CONVERSATION_COLUMNS, row, strict=True))
    record["recording"] = {key: record.pop(f"recording_{key}") for key in ("uri", "provider", "duration", "error")}
    record["analysis"] = _json_or_text(record["analysis"])
    record["post_call_actions"] = post_call_actions
    record["message_count_without_system"] = without_system
    record["metadata"] = _metadata(record["metadata"])
    return msgspec.convert(record, Conversation, from_attributes=True)


def post_call_actions_from(rows: list[tuple[Any, ...]]) -> list[PostCallAction]:
    """The actions in rows of (body, received_at) of post_call_action_executed events, in their order."""
    actions = []
    for body, received_at in rows:
        try:
            props = msgspec.json.decode(body, type=_PostCallEvent).properties
        except msgspec.DecodeError:
            continue  # stored for the record, but not a shape we can show
        actions.append(
            PostCallAction(
                tool_name=_str_or_none(props.get("tool_name")),
                status=_str_or_none(props.get("status")),
                request=props.get("request"),
                response=props.get("response"),
                received_at=received_at,
            )
        )
    return actions


def filter_conditions(where: ConversationFilter, mark: str) -> tuple[list[str], list[Any]]:
    """The status, source and updated_since conditions of ``where`` (the ones both backends write alike),
    with ``mark`` the driver's parameter placeholder, and their values."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in (("status", where.status), ("source", where.source)):
        if value is not None:
            conditions.append(f"{column} = {mark}")
            params.append(value)
    if where.updated_since is not None:
        conditions.append(f"updated_at >= {mark}")
        params.append(where.updated_since)
    return conditions, params


def message_conditions(
    mark: str, conversation_id: str, *, source: str, after: int | None, role: str | None, include_system: bool
) -> tuple[list[str], list[Any]]:
    """The conditions of :meth:`Reader.messages` (``mark`` the driver's parameter placeholder) and their values."""
    where = [f"conversation_id = {mark}", f"source = {mark}"]
    params: list[Any] = [conversation_id, source]
    if after is not None:
        where.append(f"seq > {mark}")
        params.append(after)
    if role is not None:
        where.append(f"role = {mark}")
        params.append(role)
    elif not include_system:
        where.append("role != 'system'")
    return where, params


def _json_or_text(stored: str | None) -> Any:
    """The analysis column holds JSON written by a parser; text that is not JSON is shown as it is."""
    if stored is None:
        return None
    try:
        return msgspec.json.decode(stored)
    except msgspec.DecodeError:
        return stored


def _summary(row: tuple[Any, ...]) -> ConversationSummary:
    summary = ConversationSummary(*row[:-1])
    summary.metadata = _metadata(row[-1])
    return summary


def _metadata(text: str | None) -> dict[str, str]:
    return {} if text is None else msgspec.json.decode(text, type=dict[str, str])


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
