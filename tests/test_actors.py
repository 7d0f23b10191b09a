"""Conversation actors in front of a real writer on a real SQLite file: order, coalescing, room, closing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from daemon.actors import ActorRegistry
from daemon.errors import Overloaded
from daemon.inflight import InFlight
from storage.deliveries import SEQ, WriteResult
from storage.errors import WriterClosed
from storage.writer import Writer, WriterSettings
from tests.test_writer import delivery

pytestmark = pytest.mark.anyio

Query = Callable[..., list[tuple[Any, ...]]]


@asynccontextmanager
async def actors(target: str, *, mailbox_size: int = 64, **settings: Any) -> AsyncIterator[ActorRegistry]:
    writer = Writer(WriterSettings(target, **settings))
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        registry = ActorRegistry(writer, mailbox_size=mailbox_size, max_rows=10_000, retry_after_s=1)
        try:
            yield registry
        finally:
            await registry.close()
            await writer.close()


def keyed(cid: str, n: int, contents: list[str]) -> InFlight:
    """The conversation's ``n``-th delivery: its own event (the events table records the order of
    commits) and its own positions, after those of the deliveries before it."""
    record = delivery(cid, contents).record
    rows = [(*row[:SEQ], n * len(contents) + row[SEQ], *row[SEQ + 1 :]) for row in record.rows]
    return InFlight(msgspec.structs.replace(record, key=f"test:{cid}:{n}", rows=rows))


async def settle(deliveries: list[InFlight]) -> None:
    with anyio.fail_after(10):
        for d in deliveries:
            await d.done.wait()


async def test_a_conversation_is_stored_in_order_and_what_waits_is_coalesced(target: str, db: Query) -> None:
    async with actors(target) as registry:
        sent = [keyed("c", n, [f"m{n}"]) for n in range(30)]
        for d in sent:
            registry.submit(d)
        # The first went to the writer at once; the other 29 waited for it, and went as one unit.
        assert registry.live_actors == 1
        assert registry.queued == 29
        await settle(sent)
        assert registry.live_actors == 0  # no actor outlives its deliveries
        assert registry._sink.commits == 2  # type: ignore[attr-defined]
        assert registry.inflight_bytes == 0
        assert registry.oldest_pending_at is None
    assert all(d.result is not None and d.result.inserted == 1 for d in sent)
    keys = [k for (k,) in db("SELECT delivery_key FROM events ORDER BY id")]
    assert keys == [d.record.key for d in sent]


async def test_without_room_in_the_writer_actors_wait_their_turn_and_lose_nothing(target: str, db: Query) -> None:
    # Room for about one delivery at a time: most units are refused at first and wait in line.
    async with actors(target, max_pending_rows=4) as registry:
        sent = [keyed(f"c{i % 5}", i, ["a", "b"]) for i in range(40)]
        for d in sent:
            registry.submit(d)
        assert registry._blocked, "the writer had room for everything: nothing was tested"
        await settle(sent)
        assert registry.live_actors == 0
        assert not registry._blocked
    assert all(d.error is None for d in sent)
    for i in range(5):
        order = [k for (k,) in db("SELECT delivery_key FROM events WHERE conversation_id = ? ORDER BY id", (f"c{i}",))]
        assert order == [d.record.key for d in sent if d.record.conversation_id == f"c{i}"]
    assert db("SELECT count(*) FROM messages") == [(80,)]


async def test_a_full_mailbox_refuses_and_the_others_are_still_stored(target: str, db: Query) -> None:
    async with actors(target, mailbox_size=2) as registry:
        taken = [keyed("busy", n, ["x"]) for n in range(3)]  # one in flight, two waiting
        for d in taken:
            registry.submit(d)
        with pytest.raises(Overloaded, match="2 deliveries waiting"):
            registry.submit(keyed("busy", 3, ["x"]))
        other = keyed("quiet", 0, ["y"])
        registry.submit(other)  # another conversation's mailbox is its own
        await settle([*taken, other])
    assert db("SELECT count(*) FROM events") == [(4,)]


async def test_deliveries_for_a_closed_writer_fail_and_are_not_counted_as_in_flight(db_path: Path) -> None:
    writer = Writer(WriterSettings(db_path))
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        await writer.close()
    registry = ActorRegistry(writer, mailbox_size=4, max_rows=100, retry_after_s=1)
    refused = keyed("late", 0, ["x"])
    registry.submit(refused)
    assert isinstance(refused.error, WriterClosed)
    assert registry.oldest_pending_at is None
    assert registry.inflight_bytes == 0
    assert registry.live_actors == 0


async def test_a_writer_closing_under_a_long_line_fails_every_waiting_delivery_without_recursion() -> None:
    class ClosingSink:
        """Takes one unit, then has no room; then closes."""

        def __init__(self) -> None:
            self.taken: list[InFlight] = []
            self.closed = False

        def offer(self, unit: list[InFlight]) -> bool:
            if self.closed:
                raise WriterClosed("the writer is closed")
            if self.taken:
                return False
            self.taken.extend(unit)
            return True

    sink = ClosingSink()
    registry = ActorRegistry(sink, mailbox_size=4, max_rows=100, retry_after_s=1)
    first = keyed("first", 0, ["x"])
    registry.submit(first)
    waiting = [keyed(f"c{i}", 0, ["y"]) for i in range(2_000)]  # deeper than the interpreter's stack
    for d in waiting:
        registry.submit(d)
    assert len(registry._blocked) == len(waiting)
    sink.closed = True
    first.resolve(WriteResult(received=1, inserted=1, updated=0))  # settles: the line is retried, and refused
    assert all(isinstance(d.error, WriterClosed) for d in waiting)
    assert registry.live_actors == 0
    assert registry.inflight_bytes == 0
    assert not registry._blocked
