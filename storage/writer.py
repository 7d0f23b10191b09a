"""The group-commit writer: one thread, one SQLite connection, one transaction per batch of deliveries.

The writer is a thread of its own rather than a task hopping to a worker thread per batch: it takes
the next batch the moment a commit returns, without waiting for a turn of the (busy) event loop, so
writing and request handling overlap. The event loop only queues units and, when a commit is done,
evicts caches and resolves the waiters. The task that owns the thread (``Writer.run``) does not return
before the thread has drained the queue and ended.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from anyio.abc import TaskStatus

from storage.connection import Synchronous
from storage.deliveries import Pending
from storage.engine import Engine, engine_for
from storage.errors import StorageError, StorageRejected, StorageUnavailable, WriterClosed
from storage.writes import Outcome

log = logging.getLogger("transcriptd.writer")

State = Literal["starting", "running", "draining", "closed"]
T = TypeVar("T")
Unit = Sequence[Pending]


@dataclass(frozen=True, slots=True)
class WriterSettings:
    # A SQLite file's path or a postgresql:// URL (storage.backend).
    path: str | Path
    synchronous: Synchronous = "full"
    cache_size_mib: int = 64
    busy_timeout_ms: int = 5000
    max_rows: int = 20_000
    max_delay_s: float = 0.0
    # Rows queued or being committed; past it, offer() refuses (and the actors' mailboxes fill up).
    max_pending_rows: int = 200_000
    # How long a failing storage is retried at shutdown for deliveries already acknowledged (enqueued).
    drain_deadline_s: float = 20.0
    # sqlite3's Connection subclass hook (see open_writer); the bench's simulated round trips use it.
    connection_factory: type[sqlite3.Connection] = sqlite3.Connection
    # Record each commit's changes in the outbox (changes.enabled).
    record_changes: bool = True
    # PostgreSQL: this replica's name, for its heartbeat row and its connections' application_name.
    replica: str = ""


class _Job:
    """Work on the writer's connection, run by the writer thread between batches: a readiness probe,
    a retention batch. Going through the writer keeps it from ever waiting on a lock we hold."""

    def __init__(self, work: Callable[[Any], Any], future: asyncio.Future[Any], needs_connection: bool = True) -> None:
        self.work = work
        self.future = future
        self.needs_connection = needs_connection


class Writer:
    """Owns the only write connection. Actors ``offer`` units; each commit resolves every delivery in it.

    Batches form by themselves: whatever arrives while a commit is in progress goes into the next one,
    so one fsync serves every sender that was waiting. ``max_delay_s`` can hold a batch open longer.
    """

    def __init__(
        self,
        settings: WriterSettings,
        *,
        on_commit: Callable[[Iterable[str]], None] | None = None,
        on_commit_stats: Callable[[int, float], None] | None = None,
        on_changes: Callable[[int | None], None] | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine or engine_for(
            settings.path,
            synchronous=settings.synchronous,
            cache_size_mib=settings.cache_size_mib,
            busy_timeout_ms=settings.busy_timeout_ms,
            factory=settings.connection_factory,
            replica=settings.replica,
        )
        self.state: State = "starting"
        self.last_error: str | None = None
        self.commits = 0
        # Deliveries dropped because their conversation was erased (a metric, read at scrape time).
        self.dropped_erased = 0
        self._on_commit = on_commit
        self._on_commit_stats = on_commit_stats
        # Called on the loop after each commit with the position of its last change (None: none).
        self._on_changes = on_changes
        # The highest change position when the database was opened (0: none yet).
        self.opened_at_position = 0
        # Shared with the writer thread, under _cond.
        self._cond = threading.Condition()
        self._queue: deque[Unit | _Job] = deque()
        self._closing = False
        # Event-loop side only.
        self._pending_rows = 0
        self._closed = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self.last_error is None

    async def run(self, *, task_status: TaskStatus[Writer] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open and migrate the database (failing start-up if that fails), then commit until closed."""
        self._loop = asyncio.get_running_loop()
        try:
            await anyio.to_thread.run_sync(self._open)
        except BaseException:
            self.state = "closed"
            self._closed.set()
            raise
        ended = anyio.Event()
        thread = threading.Thread(target=self._thread_main, args=(ended,), name="transcriptd-writer")
        try:
            thread.start()
            self.state = "running"
            task_status.started(self)
            await ended.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if thread.is_alive():
                    # Cancelled from outside: still commit what was queued, then stop.
                    self._close_queue()
                    await ended.wait()
                await anyio.to_thread.run_sync(self.engine.close)
                self.state = "closed"
                self._closed.set()

    def _open(self) -> None:
        self.engine.open()
        try:
            self.opened_at_position = self.engine.latest_position()
        except BaseException:
            self.engine.close()
            raise

    def offer(self, unit: Unit) -> bool:
        """Queue a unit for the next commit now; False if too many rows are pending (try again once some
        unit is resolved: the rows are released before the deliveries are)."""
        if self.state != "running":
            raise WriterClosed(f"the writer is {self.state}")
        rows = sum(d.record.size for d in unit)
        if self._pending_rows and self._pending_rows + rows > self.settings.max_pending_rows:
            return False
        with self._cond:
            if self._closing:  # the thread is ending or gone: nobody would take it
                raise WriterClosed("the writer is closing")
            self._queue.append(unit)
            self._cond.notify()
        self._pending_rows += rows
        return True

    async def run_job(self, work: Callable[[Any], T]) -> T:
        """Run ``work(connection)`` in the writer's thread between two batches, and return its result. The
        connection is the backend's own (sqlite3's, or psycopg's on PostgreSQL), so ``work`` is one of that
        backend's storage functions."""
        return await self._submit(work, needs_connection=True)

    async def _submit(self, work: Callable[[Any], T], *, needs_connection: bool) -> T:
        if self.state != "running":
            raise WriterClosed(f"the writer is {self.state}")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._cond:
            self._queue.append(_Job(work, future, needs_connection))
            self._cond.notify()
        return await future

    async def probe(self) -> str | None:
        """Commit a heartbeat row, in the writer's thread between batches: None if the database takes
        writes now. A success also clears ``last_error``: the storage has recovered."""
        try:
            result = await self._submit(lambda _none: self.engine.probe(), needs_connection=False)
        except WriterClosed as exc:
            return str(exc)
        if result is None and self.last_error is not None:
            log.warning("storage recovered (probe committed) after: %s", self.last_error)
            self.last_error = None
        return result

    async def close(self) -> None:
        """Commit everything queued, then stop. Idempotent."""
        if self.state == "running":
            self.state = "draining"
        self._close_queue()
        await self._closed.wait()

    def _close_queue(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    # --- the writer thread -------------------------------------------------------------------------

    def _thread_main(self, ended: anyio.Event) -> None:
        retry: list[Pending] = []
        backoff_s = 0.0
        drain_deadline: float | None = None
        try:
            while (taken := self._take(retry, backoff_s)) is not None:
                batch, jobs = taken
                # These names outlive the iteration: left bound, they would keep the last batch (a whole
                # drained backlog, bodies and all) alive while this thread waits for the next one.
                del taken
                for job in jobs:
                    try:
                        self._call_soon(_set_result, job.future, self._run(job))
                    except Exception as exc:
                        self._call_soon(_set_exception, job.future, exc)
                jobs = []
                if not batch:
                    continue
                retry = self._commit(batch)
                batch = []
                if not retry:
                    backoff_s = 0.0
                    continue
                backoff_s = min(2.0, max(0.05, 2 * backoff_s))
                if self._closing:
                    # Acknowledged deliveries still failing at shutdown: keep trying, but not forever.
                    drain_deadline = drain_deadline or time.monotonic() + self.settings.drain_deadline_s
                    if time.monotonic() > drain_deadline:
                        log.error(
                            "stopping with %d acknowledged deliveries not stored: storage still failing (%s)",
                            len(retry),
                            self.last_error,
                        )
                        break
        finally:
            # Whatever is left was not stored: say so to everyone still waiting, then let run() return.
            with self._cond:
                self._closing = True
                left, self._queue = list(self._queue), deque()
            for item in left:
                if isinstance(item, _Job):
                    self._call_soon(_set_exception, item.future, WriterClosed("the writer has stopped"))
                else:
                    retry.extend(item)
            if retry:
                self._call_soon(self._fail, retry, WriterClosed("the writer stopped before storing this"), None)
            self._call_soon(ended.set)

    def _take(self, retry: list[Pending], backoff_s: float) -> tuple[list[Pending], list[_Job]] | None:
        """The next batch: deliveries to retry, then whole units in arrival order, up to max_rows; and
        any jobs queued meanwhile. None once closed and drained."""
        batch, jobs = retry, []
        rows = sum(d.record.size for d in batch)
        deadline = None
        if backoff_s:
            if self._closing:
                time.sleep(backoff_s)  # nothing will wake us early any more: just wait
            else:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, timeout=backoff_s)
        with self._cond:
            while True:
                while self._queue and rows < self.settings.max_rows:
                    item = self._queue.popleft()
                    if isinstance(item, _Job):
                        jobs.append(item)
                        continue
                    batch.extend(item)
                    rows += sum(d.record.size for d in item)
                if jobs or (batch and (rows >= self.settings.max_rows or not self.settings.max_delay_s)):
                    return batch, jobs
                if self._closing and not self._queue:
                    return (batch, jobs) if batch else None
                if not batch:
                    self._cond.wait()
                    continue
                deadline = deadline or time.monotonic() + self.settings.max_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return batch, jobs
                self._cond.wait(remaining)

    def _run(self, job: _Job) -> Any:
        # A probe takes no connection here: it says why there is none (PostgreSQL down) rather than raise.
        return job.work(self.engine.connection() if job.needs_connection else None)

    def _commit(self, batch: list[Pending]) -> list[Pending]:
        """Write and commit one batch; returns the acknowledged deliveries that must be retried."""
        started = time.perf_counter()
        try:
            records = [d.record for d in batch]
            outcomes, position = self.engine.commit(records, record_changes=self.settings.record_changes)
        except Exception as exc:  # a fault of the storage (or of this code): nothing in the batch is stored
            message = f"{exc.__class__.__name__}: {exc}"
            if message != self.last_error:
                # A StorageUnavailable says itself what became of the batch (after a lost COMMIT: unknown).
                known = isinstance(exc, StorageUnavailable)
                log.error("commit failed%s: %s", "" if known else ", nothing of this batch was stored", message)
            awaited = [d for d in batch if d.awaited]
            # The engine's own StorageUnavailable already says what became of the batch (a lost COMMIT:
            # unknown); passed on as it is rather than prefixed a second time.
            error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(f"storage is unavailable: {exc}")
            self._call_soon(self._fail, awaited, error, message)
            return [d for d in batch if not d.awaited]
        seconds = time.perf_counter() - started
        log.debug("committed %d deliveries in %.1f ms", len(batch), 1000 * seconds)
        self._call_soon(self._resolve, batch, outcomes, seconds, position)
        return []

    # --- back on the event loop --------------------------------------------------------------------

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _resolve(self, batch: list[Pending], outcomes: list[Outcome], seconds: float, position: int | None) -> None:
        self.commits += 1
        if self._on_commit_stats is not None:
            written = sum(o.inserted + o.updated for o in outcomes if not isinstance(o, StorageRejected))
            self._on_commit_stats(written, seconds)
        if self.last_error is not None:
            log.warning("storage recovered after: %s", self.last_error)
            self.last_error = None
        if self._on_commit is not None:
            # Before any ack, so that a client reading after its answer sees its data.
            self._on_commit({d.record.conversation_id for d in batch})
        if self._on_changes is not None:
            self._on_changes(position)
        # Released first: a delivery settling lets its actor offer the next unit, which needs the room.
        self._release(sum(d.record.size for d in batch))
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, StorageRejected):
                delivery.fail(outcome)
                continue
            if outcome.erased:
                self.dropped_erased += 1
                log.info(
                    "dropped a %r delivery for erased conversation %r: nothing stored",
                    delivery.record.event_type,
                    delivery.record.conversation_id,
                )
            delivery.resolve(outcome)

    def _fail(self, awaited: list[Pending], error: StorageError, message: str | None) -> None:
        if message is not None:
            self.last_error = message
        self._release(sum(d.record.size for d in awaited))
        for delivery in awaited:
            delivery.fail(error)

    def _release(self, rows: int) -> None:
        self._pending_rows -= rows


def _set_result(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():  # the caller may have given up (a readiness probe's timeout)
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
