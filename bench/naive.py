"""The write-up's NestJS + Prisma + Redis webhook handler, ported faithfully, as the bench's baseline.

transcriptd grew from an optimisation write-up of such a service. For one Tavus
``application.transcription_ready`` webhook, its two code paths were:

``before``
    Look up the conversation; query for duplicates (every existing message of the conversation); inside
    one transaction, one awaited INSERT per new message, one after the other; 10 sequential cache DELs,
    one per cached page key ``messages:{conversationId}:{page}:50`` for pages 1..10; update the
    conversation; and only THEN answer (200).

``after``
    Answer at once (202) and process in the background: look up the conversation; one bulk insert with
    skip-duplicates (Prisma's ``createMany({skipDuplicates: true})``, i.e. one multi-row
    ``INSERT ... ON CONFLICT DO NOTHING``); delete the cache keys by pattern (``KEYS messages:{id}:*``
    then ``DEL``); update the conversation.

Both run on transcriptd's own storage engine and schema: the connection comes from
:func:`storage.connection.open_writer` (same pragmas) with :func:`storage.migrations.migrate` applied, and
aiosqlite drives it with one awaited ``execute`` per statement, as Prisma makes one round trip per
statement. ``statement_delay_s`` simulates that round trip at the driver boundary, so a bench can tell
which gains come from saving round trips. The rows are the ones transcriptd's readers know: a
``conversations`` row, and ``messages`` rows with ``source = 'tavus'`` and ``seq`` = the entry's index.
"""

from __future__ import annotations

import fnmatch
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import aiosqlite
import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.roundtrip import RoundTrips
from daemon.decoding import epoch_seconds
from storage.connection import open_writer
from storage.migrations import migrate

logger = logging.getLogger(__name__)

Variant = Literal["before", "after"]
Params = Sequence[Any]
Row = tuple[Any, ...]

SOURCE = "tavus"
TRANSCRIPTION_READY = "application.transcription_ready"
# The write-up cached the conversation's message list by page, 50 messages a page, and the "before"
# path invalidated the first 10 pages by name.
CACHED_PAGES = range(1, 11)
PAGE_SIZE = 50
# createMany splits its rows so no statement exceeds the engine's bound-parameter limit (SQLite's is 32766).
MAX_PARAMETERS = 32_766

MESSAGE_COLUMNS = ("conversation_id", "source", "seq", "role", "content", "timestamp", "created_at")
_INSERT_HEAD = f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) VALUES "  # noqa: S608 (constant names)
_ROW_VALUES = f"({', '.join('?' * len(MESSAGE_COLUMNS))})"
# prisma.message.create, one row.
INSERT_MESSAGE = _INSERT_HEAD + _ROW_VALUES
ROWS_PER_BULK_INSERT = MAX_PARAMETERS // len(MESSAGE_COLUMNS)
# prisma.conversation.findUnique: every column.
FIND_CONVERSATION = "SELECT * FROM conversations WHERE id = ?"
# prisma.conversation.create, when findUnique found nothing. ON CONFLICT: two deliveries of one conversation
# may both find nothing, and the second must not fail (Prisma's answer would be an upsert).
CREATE_CONVERSATION = (
    "INSERT INTO conversations (id, source, status, created_at, updated_at) VALUES (?, ?, 'active', ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
# prisma.message.findMany({where: {conversationId}}): every column of every existing message.
FIND_MESSAGES = "SELECT * FROM messages WHERE conversation_id = ? AND source = ?"
# prisma.conversation.update: ended, its replica, its message count and its last message time.
UPDATE_CONVERSATION = """
UPDATE conversations
SET status = 'ended', replica_id = coalesce(?2, replica_id),
    message_count = (SELECT count(*) FROM messages WHERE conversation_id = ?1),
    last_message_at = coalesce(?3, last_message_at), updated_at = ?4
WHERE id = ?1
"""


def bulk_insert(rows: int) -> str:
    """``prisma.message.createMany({data, skipDuplicates: true})``: one multi-row INSERT, duplicates skipped."""
    return _INSERT_HEAD + ", ".join([_ROW_VALUES] * rows) + " ON CONFLICT DO NOTHING"


def page_key(conversation_id: str, page: int) -> str:
    """The write-up's cache key for one page of a conversation's messages."""
    return f"messages:{conversation_id}:{page}:{PAGE_SIZE}"


def conversation_pattern(conversation_id: str) -> str:
    """The glob the "after" path hands to ``KEYS``: every cached page of the conversation, any size."""
    return f"messages:{conversation_id}:*"


class NaiveCache(Protocol):
    """The few cache calls the write-up made (Redis ``DEL``, ``KEYS`` + ``DEL``, ``SET``)."""

    async def delete(self, key: str) -> int:
        """Delete one key (``DEL key``); how many were deleted (0 or 1)."""
        ...

    async def delete_pattern(self, pattern: str) -> int:
        """Delete every key matching the glob (``KEYS pattern`` then ``DEL``); how many were deleted."""
        ...

    async def set(self, key: str, value: str) -> None:
        """Store a value (``SET key value``): how a read path, or a bench, fills the cache."""
        ...


class InProcessDictCache:
    """A :class:`NaiveCache` in a dict. ``delete_pattern`` scans every key, as Redis ``KEYS`` does."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def delete(self, key: str) -> int:
        return 1 if self.data.pop(key, None) is not None else 0

    async def delete_pattern(self, pattern: str) -> int:
        matching = [key for key in self.data if fnmatch.fnmatchcase(key, pattern)]
        for key in matching:
            del self.data[key]
        return len(matching)

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value


class SimulatedCache(RoundTrips, InProcessDictCache):
    """Stands in for Redis when none answers: the write-up's cache calls on a dict, each one command
    behind the simulated round trip (``command_delay_s``), counted in ``commands`` as
    :class:`bench.redis_cache.RedisCache` counts its own.

    Without it the naive handlers' cache would be free while their database pays every round trip, and a
    run without Redis could not be set beside one with it. With no delay it behaves exactly as
    :class:`InProcessDictCache` (no sleep, not even a zero one), but for the count.
    """

    def __init__(self, command_delay_s: float = 0.0) -> None:
        RoundTrips.__init__(self, command_delay_s)
        InProcessDictCache.__init__(self)

    async def delete(self, key: str) -> int:
        await self._round_trip()
        return await super().delete(key)

    async def delete_pattern(self, pattern: str) -> int:
        await self._round_trip()  # KEYS
        deleted = await super().delete_pattern(pattern)
        if deleted:
            await self._round_trip()  # the DEL of what KEYS found; RedisCache sends none when it found nothing
        return deleted

    async def set(self, key: str, value: str) -> None:
        await self._round_trip()
        await super().set(key, value)


@dataclass(frozen=True, slots=True)
class Result:
    """What one round trip brings back: the rows, and how many rows it changed."""

    rows: list[Row]
    rowcount: int


Execute = Callable[[str, Params], Awaitable[Result]]


class NaiveDriver:
    """Prisma's side of the database: one awaited ``execute`` per statement, each one round trip.

    A pool of one connection: a statement, or a whole transaction, holds it; the simulated round trip
    (``statement_delay_s``, slept before each statement) is spent holding it, as a real one keeps the
    connection busy.
    """

    def __init__(self, conn: aiosqlite.Connection, *, statement_delay_s: float = 0.0) -> None:
        self._conn = conn
        self._delay = statement_delay_s
        self._lock = anyio.Lock()
        self.statements = 0  # how many round trips were made, BEGIN and COMMIT included

    async def _round_trip(self, sql: str, params: Params = ()) -> Result:
        await anyio.sleep(self._delay)
        self.statements += 1
        async with self._conn.execute(sql, params) as cursor:
            rows = [tuple(row) for row in await cursor.fetchall()]
            return Result(rows, cursor.rowcount)

    async def close(self) -> None:
        await self._conn.close()

    async def execute(self, sql: str, params: Params = ()) -> Result:
        """One statement outside any transaction (it commits on its own)."""
        async with self._lock:
            return await self._round_trip(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Execute]:
        """``prisma.$transaction(async (tx) => ...)``: BEGIN, the statements, then COMMIT (or ROLLBACK).

        Yields the transaction's ``execute``. BEGIN and COMMIT are round trips too; BEGIN IMMEDIATE, as
        transcriptd's writer begins, takes the write lock up front.
        """
        async with self._lock:
            await self._round_trip("BEGIN IMMEDIATE")
            try:
                yield self._round_trip
                await self._round_trip("COMMIT")
            except BaseException:
                # Not a round trip the bench counts: only the failure path pays it.
                with anyio.CancelScope(shield=True):
                    if self._conn.in_transaction:
                        await self._conn.execute("ROLLBACK")
                raise


@dataclass(frozen=True, slots=True)
class Transcript:
    """What the handler takes from a ``transcription_ready`` body (Express's ``JSON.parse``, then a DTO)."""

    conversation_id: str
    replica_id: str | None
    entries: list[dict[str, Any]]


class BadRequest(ValueError):
    pass


def parse_transcript(body: Any) -> Transcript | None:
    """The transcript of a ``transcription_ready`` body; None for any other event (acknowledged, ignored)."""
    if not isinstance(body, dict):
        raise BadRequest("the body is not a JSON object")
    cid, event_type = body.get("conversation_id"), body.get("event_type")
    if not isinstance(cid, str) or not cid or not isinstance(event_type, str):
        raise BadRequest("conversation_id and event_type are required")
    if event_type != TRANSCRIPTION_READY:
        return None
    props = body.get("properties")
    transcript = props.get("transcript") if isinstance(props, dict) else None
    if not isinstance(transcript, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("role"), str) for entry in transcript
    ):
        raise BadRequest("properties.transcript must be a list of entries with a role")
    replica_id = props.get("replica_id") if isinstance(props, dict) else None
    return Transcript(cid, replica_id if isinstance(replica_id, str) else None, transcript)


def _timestamp(value: Any) -> float | None:
    return epoch_seconds(value) if isinstance(value, float | int | str) and not isinstance(value, bool) else None


def message_row(cid: str, seq: int, entry: dict[str, Any], now: float) -> Row:
    """A ``messages`` row in MESSAGE_COLUMNS order, as transcriptd would store the entry."""
    content = entry.get("content")
    return (
        cid,
        SOURCE,
        seq,
        entry["role"],
        content if isinstance(content, str) else "",
        _timestamp(entry.get("timestamp")),
        now,
    )


async def find_or_create_conversation(db: NaiveDriver, cid: str, now: float) -> None:
    """``prisma.conversation.findUnique``, then ``create`` when it is not there (messages reference it)."""
    if not (await db.execute(FIND_CONVERSATION, (cid,))).rows:
        await db.execute(CREATE_CONVERSATION, (cid, SOURCE, now, now))


async def update_conversation(db: NaiveDriver, transcript: Transcript, rows: Sequence[Row], now: float) -> None:
    """``prisma.conversation.update`` (UPDATE_CONVERSATION)."""
    last = max((row[5] for row in rows if row[5] is not None), default=None)
    await db.execute(UPDATE_CONVERSATION, (transcript.conversation_id, transcript.replica_id, last, now))


async def insert_one_by_one(db: NaiveDriver, rows: Sequence[Row]) -> int:
    """The "before" insert: BEGIN, one awaited INSERT per message in order, COMMIT; rows inserted."""
    inserted = 0
    async with db.transaction() as tx:
        for row in rows:
            inserted += (await tx(INSERT_MESSAGE, row)).rowcount
    return inserted


async def create_many(db: NaiveDriver, rows: Sequence[Row]) -> int:
    """The "after" insert: ``createMany({skipDuplicates: true})``, split as Prisma splits it; rows inserted."""
    inserted = 0
    for start in range(0, len(rows), ROWS_PER_BULK_INSERT):
        chunk = rows[start : start + ROWS_PER_BULK_INSERT]
        inserted += (await db.execute(bulk_insert(len(chunk)), [value for row in chunk for value in row])).rowcount
    return inserted


async def delete_pages(cache: NaiveCache, cid: str) -> int:
    """The "before" invalidation: 10 awaited DELs, one per cached page, one after the other; keys deleted."""
    deleted = 0
    for page in CACHED_PAGES:
        deleted += await cache.delete(page_key(cid, page))
    return deleted


async def process_before(db: NaiveDriver, cache: NaiveCache, transcript: Transcript) -> int:
    """The "before" path, all of it awaited before the answer; how many messages it inserted."""
    cid, now = transcript.conversation_id, time.time()
    await find_or_create_conversation(db, cid, now)
    existing = {row[3] for row in (await db.execute(FIND_MESSAGES, (cid, SOURCE))).rows}  # seq: the 4th column
    rows = [message_row(cid, seq, entry, now) for seq, entry in enumerate(transcript.entries) if seq not in existing]
    await insert_one_by_one(db, rows)
    await delete_pages(cache, cid)
    await update_conversation(db, transcript, rows, now)
    return len(rows)


async def process_after(db: NaiveDriver, cache: NaiveCache, transcript: Transcript) -> int:
    """The "after" path, run in the background; how many messages it inserted (createMany's ``count``)."""
    cid, now = transcript.conversation_id, time.time()
    await find_or_create_conversation(db, cid, now)
    rows = [message_row(cid, seq, entry, now) for seq, entry in enumerate(transcript.entries)]
    inserted = await create_many(db, rows)
    await cache.delete_pattern(conversation_pattern(cid))
    await update_conversation(db, transcript, rows, now)
    return inserted


async def open_database(db_path: str | Path, *, statement_delay_s: float = 0.0) -> NaiveDriver:
    """aiosqlite on transcriptd's writer connection (its pragmas), migrated to transcriptd's schema."""

    def connector() -> sqlite3.Connection:
        conn = open_writer(db_path)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    conn = await aiosqlite.Connection(connector, iter_chunk_size=64)
    return NaiveDriver(conn, statement_delay_s=statement_delay_s)


def create_naive_app(
    db_path: str | Path, *, variant: Variant, cache: NaiveCache, statement_delay_s: float = 0.0
) -> Starlette:
    """The write-up's webhook endpoint, ``POST /webhooks/tavus``, in its ``before`` or ``after`` variant.

    ``before`` answers 200 once everything is stored and invalidated. ``after`` answers 202 at once; its
    background work belongs to a task group of the lifespan, which shutdown drains (no task is lost or
    left behind, unlike the write-up's fire-and-forget promise). A background failure is logged and does
    not take the others down. Anything but a ``transcription_ready`` event is acknowledged and ignored.
    """
    if variant not in ("before", "after"):
        raise ValueError(f"unknown variant {variant!r}")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = await open_database(db_path, statement_delay_s=statement_delay_s)
        try:
            async with anyio.create_task_group() as tasks:
                state["db"], state["tasks"] = db, tasks
                yield
                # Shutdown: leaving the block waits for every background task still running.
        finally:
            state.clear()
            await db.close()

    async def process_in_background(db: NaiveDriver, transcript: Transcript) -> None:
        try:
            await process_after(db, cache, transcript)
        except Exception as exc:
            # The body holds a secret (webhook_url): name the conversation and the error, never the body.
            logger.error("background processing of %s failed: %r", transcript.conversation_id, exc)

    async def webhook(request: Request) -> JSONResponse:
        try:
            transcript = parse_transcript(await request.json())
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError and BadRequest are ValueErrors
            return JSONResponse({"error": str(exc) if isinstance(exc, BadRequest) else "invalid JSON"}, 400)
        db: NaiveDriver = state["db"]
        if transcript is None:
            return JSONResponse({"status": "ignored"}, 200)
        if variant == "before":
            inserted = await process_before(db, cache, transcript)
            return JSONResponse({"status": "stored", "inserted": inserted}, 200)
        tasks: TaskGroup = state["tasks"]
        tasks.start_soon(process_in_background, db, transcript)
        return JSONResponse({"status": "accepted"}, 202)

    return Starlette(routes=[Route("/webhooks/tavus", webhook, methods=["POST"])], lifespan=lifespan)
