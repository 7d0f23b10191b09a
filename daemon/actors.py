"""Conversation actors: one per active conversation, each with a bounded mailbox, and their registry.

An actor takes everything waiting in its mailbox, hands it to the writer as one unit, and waits for
that commit before taking the next: one conversation's deliveries are stored in the order they came,
and whatever arrives during a commit is coalesced into the next unit. Quiet actors idle out, so memory
is bounded by the conversations that are active now.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from daemon.errors import Overloaded, ShuttingDown
from storage.deliveries import Delivery
from storage.errors import StorageError

log = logging.getLogger("transcriptd.actors")

State = Literal["starting", "running", "draining", "closed"]


class Sink(Protocol):
    """Where actors send their units: the writer."""

    async def submit(self, unit: list[Delivery]) -> None: ...


class ConversationActor:
    def __init__(self, registry: ActorRegistry, conversation_id: str, mailbox_size: int) -> None:
        self.registry = registry
        self.conversation_id = conversation_id
        self.mailbox: MemoryObjectSendStream[Delivery]
        self._inbox: MemoryObjectReceiveStream[Delivery]
        self.mailbox, self._inbox = anyio.create_memory_object_stream[Delivery](mailbox_size)

    async def run(self, sink: Sink, idle_s: float, max_rows: int) -> None:
        async with self._inbox:
            while True:
                first: Delivery | None = None
                with anyio.move_on_after(idle_s):
                    try:
                        first = await self._inbox.receive()
                    except anyio.EndOfStream:
                        return
                if first is None:
                    # Idle. No await between this check and leaving the registry, so no delivery can
                    # be sent to a mailbox that nobody will read. (A send racing the timeout lands in
                    # the buffer: anyio's send_nowait does not hand an item to a receiver whose
                    # cancellation is pending, hence anyio >= 4.4 in pyproject.)
                    if self._inbox.statistics().current_buffer_used == 0:
                        self.registry._forget(self)
                        return
                    continue
                await self._flush(sink, self._coalesce(first, max_rows))

    def _coalesce(self, first: Delivery, max_rows: int) -> list[Delivery]:
        unit, rows = [first], first.size
        while rows < max_rows:
            try:
                delivery = self._inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            unit.append(delivery)
            rows += delivery.size
        return unit

    async def _flush(self, sink: Sink, unit: list[Delivery]) -> None:
        try:
            await sink.submit(unit)
        except StorageError as exc:
            for delivery in unit:
                delivery.fail(exc)
        else:
            # Every delivery of a unit is resolved by the same commit (or kept for a retry by the writer).
            await unit[-1].done.wait()
        finally:
            self.registry._settled(unit)


class ActorRegistry:
    """Routes each delivery to its conversation's actor, starting one when needed, in its own task group."""

    def __init__(
        self,
        sink: Sink,
        *,
        mailbox_size: int,
        idle_s: float,
        max_rows: int,
        retry_after_s: int,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        max_inflight_messages: int = 1_000_000,
    ) -> None:
        self.state: State = "starting"
        # Bytes of every delivery taken and not yet resolved, mailboxes and writer alike: the bound on
        # memory however many conversations the senders open.
        self.inflight_bytes = 0
        self._max_inflight_bytes = max_inflight_bytes
        # Messages of those deliveries: what the writer will have to store, so how long a drain takes.
        self.inflight_messages = 0
        self._max_inflight_messages = max_inflight_messages
        # Taken and not yet resolved, in the order taken (a dict as an ordered set): the oldest is first.
        self._pending: dict[Delivery, None] = {}
        self._sink = sink
        self._mailbox_size = mailbox_size
        self._idle_s = idle_s
        self._max_rows = max_rows
        self._retry_after_s = retry_after_s
        self._actors: dict[str, ConversationActor] = {}
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        self._closed = anyio.Event()

    @property
    def live_actors(self) -> int:
        return len(self._actors)

    @property
    def queued(self) -> int:
        return sum(a.mailbox.statistics().current_buffer_used for a in self._actors.values())

    async def run(self, *, task_status: TaskStatus[ActorRegistry] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.state = "running"
                task_status.started(self)
                await self._stop.wait()
                # Closing a mailbox ends its actor once it has flushed what was already in it.
                for actor in list(self._actors.values()):
                    actor.mailbox.close()
        finally:
            self.state = "closed"
            self._closed.set()

    def submit(self, delivery: Delivery) -> None:
        """Put a delivery in its conversation's mailbox now, or refuse it with a retryable error."""
        if self.state != "running" or self._tg is None:
            raise ShuttingDown("transcriptd is shutting down", retry_after=self._retry_after_s)
        self.check_room(delivery.weight)
        if self.inflight_messages and self.inflight_messages + delivery.received > self._max_inflight_messages:
            raise Overloaded(
                f"{self.inflight_messages} messages are waiting to be stored", retry_after=self._retry_after_s
            )
        actor = self._actors.get(delivery.conversation_id)
        if actor is None:
            actor = ConversationActor(self, delivery.conversation_id, self._mailbox_size)
            self._actors[delivery.conversation_id] = actor
            self._tg.start_soon(actor.run, self._sink, self._idle_s, self._max_rows)
        try:
            actor.mailbox.send_nowait(delivery)
        except anyio.WouldBlock:
            raise Overloaded(
                f"conversation {delivery.conversation_id!r} has {self._mailbox_size} deliveries waiting",
                retry_after=self._retry_after_s,
            ) from None
        self.inflight_bytes += delivery.weight
        self.inflight_messages += delivery.received
        self._pending[delivery] = None

    async def close(self, timeout_s: float = math.inf) -> bool:
        """Stop taking deliveries, let every actor flush its mailbox, and wait until they have, or until
        ``timeout_s``: then the actors are cancelled, and whatever the writer holds stays the writer's.
        True if every actor finished."""
        if self.state == "running":
            self.state = "draining"
        self._stop.set()
        with anyio.move_on_after(timeout_s):
            await self._closed.wait()
            return True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._closed.wait()
        return False

    def check_room(self, weight: int) -> None:
        """Refuse (503) a delivery of this weight if taking it now would go over the in-flight byte budget.
        Intake asks before reading a body whose length it knows, so an overload costs no read."""
        if self.inflight_bytes and self.inflight_bytes + weight > self._max_inflight_bytes:
            raise Overloaded(
                f"{self.inflight_bytes} bytes of deliveries are waiting to be stored", retry_after=self._retry_after_s
            )

    @property
    def oldest_pending_at(self) -> float | None:
        """When the oldest delivery not yet stored (or refused) was received."""
        for delivery in self._pending:
            if not delivery.done.is_set():  # resolved, but its actor has not run since
                return delivery.received_at
        return None

    def _settled(self, unit: list[Delivery]) -> None:
        for delivery in unit:
            self.inflight_bytes -= delivery.weight
            self.inflight_messages -= delivery.received
            self._pending.pop(delivery, None)

    def _forget(self, actor: ConversationActor) -> None:
        if self._actors.get(actor.conversation_id) is actor:
            del self._actors[actor.conversation_id]
        actor.mailbox.close()
