"""The group-commit writer: one task, one SQLite connection, one transaction per batch of deliveries."""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from storage.connection import Synchronous, open_writer
from storage.deliveries import Delivery
from storage.errors import StorageRejected, StorageUnavailable, WriterClosed
from storage.migrations import migrate
from storage.writes import write_batch

log = logging.getLogger("transcriptd.writer")

State = Literal["starting", "running", "draining", "closed"]
Unit = Sequence[Delivery]


@dataclass(frozen=True, slots=True)
class WriterSettings:
    path: str | Path
    synchronous: Synchronous = "full"
    cache_size_mib: int = 64
    busy_timeout_ms: int = 5000
    max_rows: int = 20_000
    max_delay_s: float = 0.0
    queue_units: int = 1024
    # How long a failing storage is retried at shutdown for deliveries already acknowledged (enqueued).
    drain_deadline_s: float = 20.0


class Writer:
    """Owns the only write connection. Actors ``submit`` units; each commit resolves every delivery in it.

    Batches form by themselves: whatever arrives while a commit is in progress goes into the next one,
    so one fsync serves every sender that was waiting. ``max_delay_s`` can hold a batch open longer.
    """

    def __init__(self, settings: WriterSettings, *, on_commit: Callable[[Iterable[str]], None] | None = None) -> None:
        self.settings = settings
        self.state: State = "starting"
        self.last_error: str | None = None
        self.commits = 0
        self._on_commit = on_commit
        self._send: MemoryObjectSendStream[Unit]
        self._receive: MemoryObjectReceiveStream[Unit]
        self._send, self._receive = anyio.create_memory_object_stream[Unit](settings.queue_units)
        self._conn: sqlite3.Connection | None = None
        self._retry: list[Delivery] = []
        self._backoff_s = 0.0
        self._closed = anyio.Event()
        # One thread at a time touches the connection; the limiter keeps it that way across calls.
        self._thread = anyio.CapacityLimiter(1)

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self.last_error is None

    async def run(self, *, task_status: TaskStatus[Writer] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open and migrate the database (failing start-up if that fails), then commit until closed."""
        try:
            self._conn = await anyio.to_thread.run_sync(self._open, limiter=self._thread)
            self.state = "running"
            task_status.started(self)
            await self._loop()
        finally:
            self._send.close()
            self._receive.close()
            with anyio.CancelScope(shield=True):
                if self._conn is not None:
                    await anyio.to_thread.run_sync(self._conn.close, limiter=self._thread)
                self.state = "closed"
                self._closed.set()

    def _open(self) -> sqlite3.Connection:
        s = self.settings
        conn = open_writer(
            s.path,
            synchronous=s.synchronous,
            cache_size_mib=s.cache_size_mib,
            busy_timeout_ms=s.busy_timeout_ms,
        )
        try:
            applied = migrate(conn)
        except BaseException:
            conn.close()
            raise
        if applied:
            log.info("applied migrations %s to %s", applied, s.path)
        return conn

    async def probe(self) -> str | None:
        """Take the write lock and let go, in the writer's thread: None if the database is writable now."""
        conn = self._conn
        if conn is None:
            return "the database is not open"

        def begin_and_rollback() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        try:
            await anyio.to_thread.run_sync(begin_and_rollback, limiter=self._thread)
        except sqlite3.Error as exc:
            return f"{exc.__class__.__name__}: {exc}"
        return None

    async def submit(self, unit: Unit) -> None:
        """Queue a unit for the next commit; waits while the queue is full (backpressure to the actors)."""
        if self.state != "running":
            raise WriterClosed(f"the writer is {self.state}")
        await self._send.send(unit)

    async def close(self) -> None:
        """Commit everything queued, then stop. Idempotent."""
        if self.state == "running":
            self.state = "draining"
        self._send.close()
        await self._closed.wait()

    async def _loop(self) -> None:
        deadline = math.inf
        while True:
            batch = await self._collect()
            if batch is None:
                if not self._retry:
                    return
                # Draining with acknowledged deliveries still failing: keep trying, but not forever.
                deadline = min(deadline, time.monotonic() + self.settings.drain_deadline_s)
                if time.monotonic() > deadline:
                    log.error(
                        "shutting down with %d acknowledged deliveries not stored: storage still failing (%s)",
                        len(self._retry),
                        self.last_error,
                    )
                    return
                batch = []
            await self._commit(batch)

    async def _collect(self) -> list[Delivery] | None:
        """The next batch: deliveries waiting for a retry, then every unit queued, up to max_rows."""
        batch, self._retry = self._retry, []
        if self._backoff_s:
            await anyio.sleep(self._backoff_s)
        rows = sum(d.size for d in batch)
        if not batch:
            try:
                first = await self._receive.receive()
            except anyio.EndOfStream:
                return None
            batch.extend(first)
            rows += sum(d.size for d in first)
        deadline = time.monotonic() + self.settings.max_delay_s
        while rows < self.settings.max_rows:
            unit = await self._next_unit(deadline)
            if unit is None:
                break
            batch.extend(unit)
            rows += sum(d.size for d in unit)
        return batch

    async def _next_unit(self, deadline: float) -> Unit | None:
        try:
            return self._receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        with anyio.move_on_after(remaining):
            try:
                return await self._receive.receive()
            except anyio.EndOfStream:
                return None
        return None

    async def _commit(self, batch: list[Delivery]) -> None:
        if not batch:
            return
        assert self._conn is not None
        started = time.perf_counter()
        try:
            # Not cancellable: a commit that started finishes, so every waiter learns the truth.
            outcomes = await anyio.to_thread.run_sync(write_batch, self._conn, batch, limiter=self._thread)
        except Exception as exc:  # a fault of the storage (or of this code): nothing in the batch is stored
            self._fail(batch, exc)
            return
        self.commits += 1
        if self.last_error is not None:
            log.warning("storage recovered after: %s", self.last_error)
        self.last_error, self._backoff_s = None, 0.0
        log.debug("committed %d deliveries in %.1f ms", len(batch), 1000 * (time.perf_counter() - started))
        if self._on_commit is not None:
            # Before any ack, so that a client reading after its answer sees its data.
            self._on_commit({d.conversation_id for d in batch})
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, StorageRejected):
                delivery.fail(outcome)
            else:
                delivery.resolve(outcome)

    def _fail(self, batch: list[Delivery], exc: Exception) -> None:
        message = f"{exc.__class__.__name__}: {exc}"
        if message != self.last_error:
            log.error("commit failed, nothing of this batch was stored: %s", message)
        self.last_error = message
        self._backoff_s = min(2.0, max(0.05, 2 * self._backoff_s))
        error = StorageUnavailable(f"storage is unavailable: {exc}")
        for delivery in batch:
            if delivery.awaited:
                delivery.fail(error)
            else:
                self._retry.append(delivery)
