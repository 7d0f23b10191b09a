"""Replay: re-derive conversations and messages from the raw ``events``, once a parsing bug is fixed.

Each stored body is parsed again by the parser intake uses for its source (handed in by the caller, so
storage does not depend on the HTTP layer), in ``events.id`` order, which is commit order, and written
by the writer's own code (``write_deliveries``) without inserting the event again. Writes are upserts,
so replaying changes only what the parsers now derive differently, and a second replay changes nothing.
Replay adds and corrects rows; it never deletes one.

Transcript rows carry their position (``seq``). Messages of the generic endpoint are *appended*: the
writer gives each the next free position of its conversation's stream, and a message whose client id
was seen before takes none and updates the one that has it. Appending again would add every message a
second time, so replay computes those positions itself, the same way, from the conversation's events
in order (its earlier events are re-read when the replay starts after them, with ``since``): an appended
message is written at the very position it got when it was first stored.

Work goes in small transactions (a few hundred events, a few thousand rows), parsed before the write
lock is taken, so a daemon serving the same file waits at most one small batch.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from storage.connection import immediate
from storage.deliveries import MessageRow, Record
from storage.outbox import ChangeSet
from storage.writes import write_in_savepoint


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    delivery_key: str
    source: str
    event_type: str
    conversation_id: str
    received_at: float
    body: bytes


# Parse a stored event into its delivery's record, as intake would have; raises if the body cannot be parsed.
Parse = Callable[[StoredEvent], Record]


@dataclass(slots=True)
class ReplayStats:
    events: int = 0  # parsed and written
    inserted: int = 0  # message rows
    updated: int = 0  # message rows rewritten because the parser now derives them differently
    rejected_items: int = 0  # entries the parser refuses inside otherwise good bodies
    unparsed: int = 0  # events the parser refuses as a whole now
    unknown_source: int = 0  # events of a source with no parser
    refused: int = 0  # events whose rows the database refused
    transactions: int = 0

    @property
    def failed(self) -> int:
        return self.unparsed + self.refused


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    max_events: int = 200
    max_rows: int = 5000
    max_bytes: int = 32 * 1024 * 1024  # of raw bodies held in memory at once
    max_streams: int = 10_000  # append streams whose positions are remembered; others are re-read on need


_EVENT = "SELECT id, delivery_key, source, event_type, conversation_id, received_at, body FROM events"
NEXT_EVENT = _EVENT + " WHERE id > ? AND id <= ? ORDER BY id LIMIT 1"
NEXT_EVENT_OF = _EVENT + " WHERE conversation_id = ? AND id > ? AND id <= ? ORDER BY id LIMIT 1"
EARLIER_EVENTS = _EVENT + " WHERE conversation_id = ? AND source = ? AND id < ? ORDER BY id"


@dataclass(slots=True)
class _Stream:
    """One conversation's append stream, as the writer built it: the next position, and the client ids."""

    next_seq: int = 0
    by_external_id: dict[str, tuple[int, float | None]] = field(default_factory=dict)


def replay(
    conn: sqlite3.Connection,
    parsers: Mapping[str, Parse],
    *,
    conversation_id: str | None = None,
    since: float | None = None,
    limits: ReplayLimits | None = None,
    on_failure: Callable[[StoredEvent, str], None] | None = None,
) -> ReplayStats:
    """Replay the events (of one conversation, and from the first one received at or after ``since``)
    up to the last one stored when the replay began. ``conn`` is in autocommit mode, e.g. ``open_writer``'s.

    ``sqlite3.OperationalError`` (locked for longer than the busy timeout, disk full) stops the replay
    and propagates; what was committed until then stays, and replaying again is safe.
    """
    limits = limits or ReplayLimits()
    bounds = _bounds(conn, conversation_id, since)
    if bounds is None:
        return ReplayStats()

    def earlier(cid: str, source: str, before_id: int) -> list[StoredEvent]:
        return [StoredEvent(*row) for row in conn.execute(EARLIER_EVENTS, (cid, source, before_id)).fetchall()]

    def write(batch: list[tuple[StoredEvent, Record]], stats: ReplayStats) -> None:
        _write(conn, batch, stats, on_failure)

    return replay_events(_events(conn, conversation_id, *bounds), parsers, earlier, write, limits, on_failure)


# The events of one conversation and source stored before an event id, in id order.
Earlier = Callable[[str, str, int], Iterable[StoredEvent]]
# Write one batch of parsed events in a transaction, adding what it did to the stats.
WriteBatch = Callable[[list[tuple[StoredEvent, Record]], ReplayStats], None]


def replay_events(
    events: Iterable[StoredEvent],
    parsers: Mapping[str, Parse],
    earlier: Earlier,
    write: WriteBatch,
    limits: ReplayLimits,
    on_failure: Callable[[StoredEvent, str], None] | None,
) -> ReplayStats:
    """The replay itself, whichever backend stores the events: parse each, place its appended messages,
    and hand the parsed events to ``write`` in batches within ``limits``."""
    stats = ReplayStats()
    positions = _Positions(earlier, parsers, limits.max_streams)
    batch: list[tuple[StoredEvent, Record]] = []
    rows = size = 0
    for event in events:
        parse = parsers.get(event.source)
        if parse is None:
            stats.unknown_source += 1
            continue
        try:
            delivery = parse_stored(parse, event)
        except Exception as exc:  # whatever the parser raises, this event cannot be derived now
            stats.unparsed += 1
            if on_failure is not None:
                on_failure(event, f"{exc.__class__.__name__}: {exc}")
            continue
        delivery = positions.assign(delivery, event.id)
        stats.rejected_items += delivery.rejected
        batch.append((event, delivery))
        rows += len(delivery.rows)
        size += len(event.body)
        if len(batch) >= limits.max_events or rows >= limits.max_rows or size >= limits.max_bytes:
            write(batch, stats)
            batch, rows, size = [], 0, 0
    if batch:
        write(batch, stats)
    return stats


def has_events(conn: sqlite3.Connection, conversation_id: str) -> bool:
    """Whether any event of ``conversation_id`` is stored (a replay of it would find something)."""
    return (
        conn.execute("SELECT 1 FROM events WHERE conversation_id = ? LIMIT 1", (conversation_id,)).fetchone()
        is not None
    )


def _bounds(conn: sqlite3.Connection, conversation_id: str | None, since: float | None) -> tuple[int, int] | None:
    """(after, last): replay the events with after < id <= last; None if there are none."""
    return replay_bounds(lambda sql, params: conn.execute(sql, params).fetchone(), "?", conversation_id, since)


def _events(conn: sqlite3.Connection, conversation_id: str | None, after: int, last: int) -> Iterator[StoredEvent]:
    if conversation_id is None:
        return stored_events(lambda at: conn.execute(NEXT_EVENT, (at, last)).fetchone(), after)
    return stored_events(lambda at: conn.execute(NEXT_EVENT_OF, (conversation_id, at, last)).fetchone(), after)


# Run one query of a single value, with its parameters; its one row, or None.
FetchOne = Callable[[str, list[Any]], Sequence[Any] | None]


def replay_bounds(
    fetchone: FetchOne, mark: str, conversation_id: str | None, since: float | None
) -> tuple[int, int] | None:
    """(after, last) for either backend (``mark`` its parameter placeholder): replay the events with
    after < id <= last; None if there are none."""
    where, params = (f"WHERE conversation_id = {mark}", [conversation_id]) if conversation_id is not None else ("", [])
    row = fetchone(f"SELECT max(id) FROM events {where}", params)  # noqa: S608 (constant text)
    if row is None or row[0] is None:
        return None
    last: int = row[0]
    if since is None:
        return 0, last
    where = f"{where} AND received_at >= {mark}" if where else f"WHERE received_at >= {mark}"
    row = fetchone(f"SELECT min(id) FROM events {where}", [*params, since])  # noqa: S608
    return None if row is None or row[0] is None else (row[0] - 1, last)


def stored_events(next_row: Callable[[int], Sequence[Any] | None], after: int) -> Iterator[StoredEvent]:
    """The events after ``after``, one at a time, each by its own short query (``next_row``: the row of the
    first event after an id, or None): no read snapshot outlives a batch, and at most one raw body is read
    ahead."""
    while True:
        row = next_row(after)
        if row is None:
            return
        event = StoredEvent(*row)
        yield event
        after = event.id


def parse_stored(parse: Parse, event: StoredEvent) -> Record:
    """The record a stored event makes again, under the key it was stored under."""
    # The key it was stored under (a webhook-id header, or the one key for both join events): the event
    # row is the same, whatever key the headers-less parse would compute.
    return msgspec.structs.replace(parse(event), key=event.delivery_key)


class _Positions:
    """Gives appended messages the positions the writer gave them, so a replay re-writes them in place."""

    def __init__(self, earlier: Earlier, parsers: Mapping[str, Parse], max_streams: int) -> None:
        self._earlier_events = earlier
        self._parsers = parsers
        self._max_streams = max(1, max_streams)
        self._streams: OrderedDict[tuple[str, str], _Stream] = OrderedDict()

    def assign(self, delivery: Record, event_id: int) -> Record:
        """``delivery`` with its appended rows turned into rows at fixed positions."""
        if not delivery.append_rows:
            return delivery
        key = (delivery.conversation_id, delivery.source)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._earlier(key, event_id)
        self._streams[key] = stream
        self._streams.move_to_end(key)
        while len(self._streams) > self._max_streams:
            self._streams.popitem(last=False)
        return msgspec.structs.replace(delivery, rows=[*delivery.rows, *_place(stream, delivery)], append_rows=())

    def _earlier(self, key: tuple[str, str], before_id: int) -> _Stream:
        """The stream as the events before ``before_id`` left it: they are parsed again, not written."""
        stream = _Stream()
        parse = self._parsers[key[1]]
        for event in self._earlier_events(*key, before_id):
            try:
                earlier = parse(event)
            except Exception:  # noqa: S112 (the main pass reports it, when it replays that event)
                continue
            _place(stream, earlier)
        return stream


def _place(stream: _Stream, delivery: Record) -> list[MessageRow]:
    """What ``APPEND_MESSAGE`` and ``UPDATE_CHANGED_BY_EXTERNAL_ID`` did, one row after the other."""
    placed: list[MessageRow] = []
    for cid, source, role, content, timestamp, external_id, created_at in delivery.append_rows:
        seen = stream.by_external_id.get(external_id) if external_id is not None else None
        if seen is None:
            seq = stream.next_seq
            stream.next_seq += 1
        else:
            # A client id seen before: no new position; the message there is rewritten, keeping a
            # timestamp the new one leaves out.
            seq, earlier_timestamp = seen
            timestamp = earlier_timestamp if timestamp is None else timestamp
        if external_id is not None:
            stream.by_external_id[external_id] = (seq, timestamp)
        placed.append((cid, source, seq, role, content, timestamp, None, None, None, external_id, created_at))
    return placed


def _write(
    conn: sqlite3.Connection,
    batch: list[tuple[StoredEvent, Record]],
    stats: ReplayStats,
    on_failure: Callable[[StoredEvent, str], None] | None,
) -> None:
    """One transaction; each delivery in a savepoint, so rows the database refuses cost only their event."""
    done = ReplayStats()
    refused: list[tuple[StoredEvent, str]] = []
    with immediate(conn):
        changes = ChangeSet()
        for event, delivery in batch:
            result = write_in_savepoint(conn, delivery, changes, store_events=False)
            if isinstance(result, Exception):
                refused.append((event, f"the database refused its rows: {result.__class__.__name__}: {result}"))
                continue
            done.events += 1
            done.inserted += result.inserted
            done.updated += result.updated
        changes.record(conn)
    stats.events += done.events
    stats.inserted += done.inserted
    stats.updated += done.updated
    stats.refused += len(refused)
    stats.transactions += 1
    if on_failure is not None:
        for event, message in refused:
            on_failure(event, message)
