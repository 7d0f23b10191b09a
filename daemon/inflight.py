"""A delivery in flight: its record, and what becomes of it between intake and the commit.

Who sets what: intake (or the reconciler) makes it, with ``awaited``; the actors' registry sets
``taken_at`` and ``on_settled`` when it takes it; the writer (or the registry, when the writer is
closed) settles it once, with ``resolve`` or ``fail``; ``done`` is set then, or earlier by the registry
when a waiting sender is given up on (``ActorRegistry.give_up_waiting``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from storage.deliveries import Record, WriteResult
from storage.errors import StorageError

log = logging.getLogger("transcriptd.deliveries")


class InFlight:
    """One accepted delivery until it is settled (storage.deliveries.Pending, for the writer)."""

    __slots__ = ("awaited", "done", "error", "on_settled", "record", "result", "taken_at")

    def __init__(self, record: Record, *, awaited: bool = True) -> None:
        self.record = record
        # Someone waits for the commit (durable ack): on a storage fault, fail fast so they can retry.
        # Nobody waits (enqueued ack): the delivery was acknowledged, so the writer keeps retrying it.
        self.awaited = awaited
        # When the registry took it (time.monotonic()): how long its sender has been waiting.
        self.taken_at = 0.0
        self.result: WriteResult | None = None
        self.error: StorageError | None = None
        self.done = anyio.Event()
        # Called once, on the event loop, when the delivery is resolved or failed: its actor moves on.
        self.on_settled: Callable[[InFlight], None] | None = None

    def resolve(self, result: WriteResult) -> None:
        self.result = result
        self._settle()

    def fail(self, error: StorageError) -> None:
        self.error = error
        self._settle()

    def _settle(self) -> None:
        self.done.set()
        settled, self.on_settled = self.on_settled, None
        if settled is not None:
            try:
                settled(self)
            except Exception:
                # Called from the writer's resolution loop: one broken callback must not leave the other
                # deliveries of the commit unanswered.
                log.exception("settling delivery %s failed", self.record.key)
