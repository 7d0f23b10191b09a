"""Conversation actors: one per conversation with deliveries in flight, each with a bounded mailbox.

An actor hands everything waiting in its mailbox to the writer as one unit, and takes the next only once
that unit is settled (committed, or failed for good): one conversation's deliveries are stored in the
order they came, and whatever arrives meanwhile is coalesced into the next unit. An actor with nothing
in flight is dropped at once, so memory is bounded by the conversations active now.

An actor is a state machine moved by two events, both on the event loop: a delivery arriving (intake)
and a delivery settling (the writer's resolution). It is not a task: measured at 64 concurrent senders,
a task per conversation (the spawn, a mailbox stream, an idle timer, three wake-ups per delivery) cost
about a fifth of the durable throughput, all of it on the event loop the writer shares the GIL with.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

import anyio

from daemon.errors import Overloaded, ShuttingDown
from daemon.inflight import InFlight
from storage.errors import StorageError, WriterClosed

log = logging.getLogger("transcriptd.actors")

State = Literal["running", "draining", "closed"]


class Sink(Protocol):
    """Where actors send their units: the writer."""

    def offer(self, unit: list[InFlight]) -> bool:
        """Queue ``unit`` now, or return False if there is no room (yet); raise StorageError if closed."""
        ...


class ConversationActor:
    __slots__ = ("blocked", "conversation_id", "in_flight", "mailbox")

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.mailbox: deque[InFlight] = deque()
        # Deliveries handed to the writer and not settled yet: the next unit waits for them.
        self.in_flight = 0
        # The writer had no room for the next unit: it waits in the registry's line.
        self.blocked = False


class ActorRegistry:
    """Routes each delivery to its conversation's actor, creating one when needed, and moves the actors
    along as the writer settles their units."""

    def __init__(
        self,
        sink: Sink,
        *,
        mailbox_size: int,
        max_rows: int,
        retry_after_s: int,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        max_inflight_messages: int = 1_000_000,
        on_drained: Callable[[int], None] | None = None,
    ) -> None:
        self.state: State = "running"
        # Bytes of every delivery taken and not yet settled, mailboxes and writer alike: the bound on
        # memory however many conversations the senders open.
        self.inflight_bytes = 0
        self._max_inflight_bytes = max_inflight_bytes
        # The most in flight since it was last zero; handed to ``on_drained`` when it comes back to zero
        # (the memory trimmer: a drained backlog leaves its memory in malloc's free lists).
        self._peak_bytes = 0
        self._on_drained = on_drained
        # Messages of those deliveries: what the writer will have to store, so how long a drain takes.
        self.inflight_messages = 0
        self._max_inflight_messages = max_inflight_messages
        # Taken and not yet settled, in the order taken (a dict as an ordered set): the oldest is first.
        self._pending: dict[InFlight, None] = {}
        self._sink = sink
        self._mailbox_size = mailbox_size
        self._max_rows = max_rows
        self._retry_after_s = retry_after_s
        self._actors: dict[str, ConversationActor] = {}
        # Actors whose next unit the writer had no room for, in the order they asked.
        self._blocked: deque[ConversationActor] = deque()
        # The line above is being worked through: a delivery settling meanwhile leaves it to that loop.
        self._retrying = False
        self._drained = anyio.Event()

    @property
    def live_actors(self) -> int:
        return len(self._actors)

    @property
    def queued(self) -> int:
        return sum(len(a.mailbox) for a in self._actors.values())

    @property
    def oldest_pending_at(self) -> float | None:
        """When the oldest delivery not yet stored (or refused) was received."""
        oldest = next(iter(self._pending), None)
        return None if oldest is None else oldest.record.received_at

    def submit(self, delivery: InFlight) -> None:
        """Put a delivery in its conversation's mailbox now, or refuse it with a retryable error."""
        if self.state != "running":
            raise ShuttingDown("transcriptd is shutting down", retry_after=self._retry_after_s)
        record = delivery.record
        self.check_room(record.weight)
        if self.inflight_messages and self.inflight_messages + record.received > self._max_inflight_messages:
            raise Overloaded(
                f"{self.inflight_messages} messages are waiting to be stored", retry_after=self._retry_after_s
            )
        actor = self._actors.get(record.conversation_id)
        if actor is None:
            actor = self._actors[record.conversation_id] = ConversationActor(record.conversation_id)
        elif len(actor.mailbox) >= self._mailbox_size:
            raise Overloaded(
                f"conversation {record.conversation_id!r} has {self._mailbox_size} deliveries waiting",
                retry_after=self._retry_after_s,
            )
        actor.mailbox.append(delivery)
        delivery.taken_at = time.monotonic()
        self.inflight_bytes += record.weight
        if self.inflight_bytes > self._peak_bytes:
            self._peak_bytes = self.inflight_bytes
        self.inflight_messages += record.received
        self._pending[delivery] = None
        delivery.on_settled = self._settled
        if not actor.in_flight and not actor.blocked:
            self._go(actor)

    def give_up_waiting(self, taken_before: float) -> None:
        """Wake whoever waits for a delivery taken before ``taken_before`` (``time.monotonic()``) and not
        settled yet: intake answers 503 and its sender retries. The delivery itself stays queued, and
        the retry is deduplicated."""
        for delivery in self._pending:  # oldest first
            if delivery.taken_at > taken_before:
                break
            if delivery.awaited:
                delivery.done.set()

    def check_room(self, weight: int) -> None:
        """Refuse (503) a delivery of this weight if taking it now would go over the in-flight byte budget.
        Intake asks before reading a body whose length it knows, so an overload costs no read."""
        if self.inflight_bytes and self.inflight_bytes + weight > self._max_inflight_bytes:
            raise Overloaded(
                f"{self.inflight_bytes} bytes of deliveries are waiting to be stored", retry_after=self._retry_after_s
            )

    async def close(self, timeout_s: float = math.inf) -> bool:
        """Stop taking deliveries and let every actor flush its mailbox, until none is left or ``timeout_s``
        has passed: then the mailboxes are abandoned (logged), and whatever the writer holds stays the
        writer's. True if every actor finished."""
        if self.state == "running":
            self.state = "draining"
        if self._actors:
            with anyio.move_on_after(timeout_s):
                await self._drained.wait()
        drained = not self._actors
        if not drained:
            self._abandon()
        self.state = "closed"
        return drained

    # --- moved by the writer's resolutions, on the event loop ------------------------------------

    def _go(self, actor: ConversationActor) -> None:
        """The actor has nothing in flight: hand its next unit over, or join the line for room."""
        if self._blocked or not self._flush(actor):
            actor.blocked = True
            self._blocked.append(actor)

    def _flush(self, actor: ConversationActor) -> bool:
        """Hand everything in the mailbox (up to ``max_rows``) to the writer as one unit; False, with the
        mailbox untouched, if the writer has no room for it now."""
        mailbox, rows = actor.mailbox, 0
        unit: list[InFlight] = []
        for delivery in mailbox:
            if unit and rows >= self._max_rows:
                break
            unit.append(delivery)
            rows += delivery.record.size
        try:
            taken = self._sink.offer(unit)
        except StorageError as exc:  # the writer is closed: nothing in this mailbox can be stored
            unit = list(mailbox)
            mailbox.clear()
            actor.in_flight = len(unit)
            for delivery in unit:
                delivery.fail(exc)
            return True
        if taken:
            for _ in unit:
                mailbox.popleft()
            actor.in_flight = len(unit)
        return taken

    def _settled(self, delivery: InFlight) -> None:
        if self._pending.pop(delivery, self) is self:
            return  # abandoned at close, and the writer settled it after all
        record = delivery.record
        self.inflight_bytes -= record.weight
        self.inflight_messages -= record.received
        if not self.inflight_bytes and self._on_drained is not None:
            peak, self._peak_bytes = self._peak_bytes, 0
            self._on_drained(peak)
        actor = self._actors[record.conversation_id]
        actor.in_flight -= 1
        if not actor.in_flight:
            if actor.mailbox:
                self._go(actor)
            else:
                del self._actors[actor.conversation_id]
                if not self._actors and self.state != "running":
                    self._drained.set()
        if self._retrying:
            return  # settled from inside the loop below (a closed writer fails units at once): it goes on
        # The writer released this delivery's rows before settling it: maybe room for the line now.
        self._retrying = True
        try:
            while self._blocked:
                if not self._flush(self._blocked[0]):
                    break  # still no room: the head keeps its place
                self._blocked.popleft().blocked = False
        finally:
            self._retrying = False

    def _abandon(self) -> None:
        # What the writer holds stays the writer's: it may still commit it, and its answer (durable) or
        # its log line (enqueued) says so; the registry simply stops counting it.
        left = [d for actor in self._actors.values() for d in actor.mailbox]
        self._pending.clear()  # first: what settles from here on is not ours to count
        self._actors.clear()
        self._blocked.clear()
        self.inflight_bytes = self.inflight_messages = 0
        if left:
            log.error("stopping with %d deliveries never handed to the writer: not stored", len(left))
        for delivery in left:
            delivery.fail(WriterClosed("transcriptd stopped before storing this"))
