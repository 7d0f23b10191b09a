"""Reads for the API on PostgreSQL: storage.queries' Reader on a small pool of read-only connections.

The same methods, arguments and return types as the SQLite Reader, so the daemon does not need to know
which one it holds. Every replica reads the one database, so a cached page is good only while the
conversation's ``rev`` is unchanged (:meth:`Reader.rev`): ``shared`` says so to the cache.

A server that cannot be reached at :meth:`Reader.open` raises ``ServerUnreachable`` (one line, no
password); a connection lost later, or no connection free in time, raises ``StorageUnavailable`` for that
read, which the API answers 503 with ``Retry-After``. The pool drops a broken connection and opens a new
one for the next read.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from storage import search as fts
from storage.errors import StorageUnavailable
from storage.postgres import search as pg_search
from storage.postgres.connection import CONNECT_TIMEOUT_S, ServerUnreachable, unreachable
from storage.queries import (
    CONVERSATION_COLUMNS,
    SUMMARY_COLUMNS,
    Conversation,
    ConversationFilter,
    ConversationSummary,
    Message,
    PostCallAction,
    _summary,
    conversation_from_row,
    filter_conditions,
    message_conditions,
    post_call_actions_from,
)

AsyncConnection = psycopg.AsyncConnection[tuple[Any, ...]]

# How long a read waits for a free connection before it is answered 503 (a few connections serve many
# requests in turn, each in milliseconds; a wait this long means the server is not answering, and a load
# balancer should hear so soon).
POOL_WAIT_S = 3.0


class Reader:
    """A few read-only connections to the server, lent out per read by a pool."""

    # Other replicas write the same database: a cached page must be checked against rev() before serving.
    shared: bool = True

    def __init__(self, url: str, *, connections: int = 2) -> None:
        self.url = url
        self._count = connections
        self._pool: AsyncConnectionPool[AsyncConnection] | None = None

    def _connection_options(self) -> dict[str, Any]:
        # Added to the URL's own options (a search_path, say), not in their place.
        given = conninfo_to_dict(self.url).get("options") or ""
        return {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "transcriptd-reads",
            "options": f"{given} -c default_transaction_read_only=on".strip(),
        }

    async def open(self) -> None:
        options = self._connection_options()
        # One connection first, for libpq's own reason when it fails: the pool would only time out.
        try:
            probe = await psycopg.AsyncConnection.connect(self.url, **options)
        except psycopg.Error as exc:
            raise ServerUnreachable(unreachable(self.url, exc)) from None
        await probe.close()
        pool: AsyncConnectionPool[AsyncConnection] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self._count,
            kwargs=options,
            open=False,
            timeout=POOL_WAIT_S,
            name="transcriptd-reads",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout as exc:
            await pool.close()
            raise ServerUnreachable(unreachable(self.url, exc)) from None
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _all(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> list[tuple[Any, ...]]:
        if self._pool is None:
            raise StorageUnavailable("storage is unavailable: the PostgreSQL reader is not open")
        values = params.values() if isinstance(params, dict) else params
        if any(isinstance(value, str) and "\x00" in value for value in values):
            # PostgreSQL's text cannot hold U+0000 (psycopg refuses to send it), so no stored row equals a
            # value holding one: every read here filters by equality, and SQLite answers nothing too.
            return []
        for attempt in (1, 2):
            try:
                async with self._pool.connection() as conn:
                    cursor = await conn.execute(sql, params)
                    return await cursor.fetchall()
            except PoolTimeout as exc:
                raise StorageUnavailable(f"storage is unavailable: {unreachable(self.url, exc)}") from exc
            except psycopg.OperationalError as exc:  # a lost connection, a server shutting down
                # A pooled connection found lost (the server restarted since it was last lent) is
                # dropped by the pool; a read is safe to run again, once, on another.
                if attempt == 2:
                    raise StorageUnavailable(f"storage is unavailable: {unreachable(self.url, exc)}") from exc
        raise AssertionError("unreachable")

    async def rev(self, conversation_id: str) -> int | None:
        """The conversation's ``rev`` (bumped by every write to it, from any replica); None if not stored."""
        rows = await self._all(REV, (conversation_id,))
        return int(rows[0][0]) if rows else None

    async def conversation(self, conversation_id: str) -> Conversation | None:
        rows = await self._all(CONVERSATION, (conversation_id,))
        if not rows:
            return None
        actions = await self.post_call_actions(conversation_id)
        ((without_system,),) = await self._all(
            "SELECT count(*) FROM messages WHERE conversation_id = %s AND role != 'system'", (conversation_id,)
        )
        return conversation_from_row(rows[0], actions, without_system)

    async def post_call_actions(self, conversation_id: str) -> list[PostCallAction]:
        """From the raw events: they are kept there as Tavus sent them, in arrival order."""
        rows = await self._all(
            "SELECT body, received_at FROM events WHERE conversation_id = %s "
            "AND event_type = 'application.post_call_action_executed' ORDER BY id",
            (conversation_id,),
        )
        return post_call_actions_from(rows)

    async def conversations(
        self, limit: int, before: tuple[float, str] | None, where: ConversationFilter | None = None
    ) -> list[ConversationSummary]:
        """Newest activity first; ``before`` is the (updated_at, id) of the last one already seen; ``where``
        keeps only the conversations that match it. Ids are COLLATE "C": the order SQLite pages in."""
        where = where or ConversationFilter()
        conditions: list[str] = []
        params: list[Any] = []
        if before is not None:
            at, last_id = before
            if "\x00" in last_id:
                # Not sendable, and no stored id holds one: in byte order an id is below p + NUL + anything
                # exactly when it is at most p, so a client's cursor pages as on SQLite.
                conditions.append("(updated_at, id) <= (%s::float8, %s::text)")
                params += [at, last_id.partition("\x00")[0]]
            else:
                conditions.append("(updated_at, id) < (%s::float8, %s::text)")
                params += [at, last_id]
        filtered, values = filter_conditions(where, "%s")
        conditions += filtered
        params += values
        for key, value in where.metadata:
            # Every value stored is a JSON string, so ->> gives what SQLite's json_extract gives.
            conditions.append("metadata::jsonb ->> %s = %s")
            params += [key, value]
        clause = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        # Assembled from the constant fragments above; values are all parameters.
        rows = await self._all(
            f"SELECT {SUMMARY_COLUMNS} FROM conversations {clause}ORDER BY updated_at DESC, id DESC LIMIT %s",  # noqa: S608
            (*params, limit),
        )
        return [_summary(row) for row in rows]

    async def has_role(self, conversation_id: str, role: str) -> bool:
        rows = await self._all(
            "SELECT 1 FROM messages WHERE conversation_id = %s AND role = %s LIMIT 1", (conversation_id, role)
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
            "%s", conversation_id, source=source, after=after, role=role, include_system=include_system
        )
        params += [limit, offset]
        # The WHERE clause is assembled from the constant fragments above; values are all parameters.
        rows = await self._all(
            "SELECT seq, role, content, source, timestamp, seconds_from_start, duration, inference_id, external_id,"  # noqa: S608
            " vendor_role "
            f"FROM messages WHERE {' AND '.join(where)} ORDER BY seq LIMIT %s OFFSET %s",
            tuple(params),
        )
        return [Message(*row) for row in rows]

    async def changes(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Rows of :data:`CHANGES` after position ``after``, in position order."""
        return await self._all(CHANGES, (after, limit))

    async def search(self, query: fts.SearchQuery) -> fts.SearchPage:
        """One page of full-text hits (storage.postgres.search); QuerySyntaxError or CursorError for bad input."""
        return await pg_search.run(self._all, query)

    async def timeline(
        self, conversation_id: str, *, limit: int, after: tuple[float, int, int] | None, bodies: bool
    ) -> list[tuple[Any, ...]]:
        """Rows of :data:`TIMELINE`: (kind: 0 event, 1 dead letter, id, event_type, source, received_at,
        delivery_key, size, problems, error, attempts, body or None)."""
        at, kind, row_id = after or (None, None, None)
        return await self._all(
            TIMELINE, {"cid": conversation_id, "limit": limit, "bodies": bodies, "at": at, "kind": kind, "id": row_id}
        )

    async def event_body(self, conversation_id: str, kind: int, row_id: int) -> bytes | None:
        """The raw body of one timeline entry (kind 0: ``events``, 1: ``dead_letters``), None if not stored."""
        rows = await self._all(DEAD_LETTER_BODY if kind else EVENT_BODY, (row_id, conversation_id))
        return bytes(rows[0][0]) if rows else None


REV = "SELECT rev FROM conversations WHERE id = %s"

CONVERSATION = f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations WHERE id = %s"  # noqa: S608

EVENT_BODY = "SELECT body FROM events WHERE id = %s AND conversation_id = %s"
DEAD_LETTER_BODY = "SELECT body FROM dead_letters WHERE id = %s AND conversation_id = %s"

# The outbox (storage.outbox), by position: the change feed's page.
CHANGES = """
SELECT position, conversation_id, source, status, kinds, first_seq, last_seq, committed_at
FROM changes WHERE position > %s ORDER BY position LIMIT %s
"""

# A conversation's delivery timeline, as storage.queries.TIMELINE: its stored events, and the deliveries
# the database refused and that are still unresolved in dead_letters, in the order they arrived. Bodies
# are read only when asked for. %(at)s, %(kind)s, %(id)s: the last row already seen, or NULL.
TIMELINE = """
SELECT kind, id, event_type, source, received_at, delivery_key, size, problems, error, attempts, body FROM (
    SELECT 0 AS kind, id, event_type, source, received_at, delivery_key, octet_length(body) AS size, problems,
           NULL::text AS error, NULL::bigint AS attempts, CASE WHEN %(bodies)s THEN body END AS body
    FROM events WHERE conversation_id = %(cid)s
    UNION ALL
    SELECT 1, id, event_type, source, received_at, delivery_key, octet_length(body), 0, error, attempts,
           CASE WHEN %(bodies)s THEN body END
    FROM dead_letters WHERE conversation_id = %(cid)s AND resolved_at IS NULL
) AS timeline
WHERE %(at)s::float8 IS NULL OR (received_at, kind, id) > (%(at)s::float8, %(kind)s::integer, %(id)s::bigint)
ORDER BY received_at, kind, id LIMIT %(limit)s
"""
