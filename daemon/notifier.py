"""The sender of outbound webhooks (``notify.url``): every change of the outbox, to every receiver, at least once.

One scheduling loop per daemon, a task in the lifespan's task group. Each turn it records what the finished
attempts came to and takes new changes in, in one short job on the writer's connection, then reads (on a
connection of its own, in a worker thread) which conversations' heads are due, and starts an attempt for
each, at most ``notify.max_parallel`` per receiver and never two of one conversation at once. A commit wakes
it (``daemon.changes_signal``); it also looks again every ``poll_s``, for what an operator command wrote
from another process.

Nothing is lost by a crash: an attempt not recorded as delivered is made again after the restart (the
receiver dedupes by ``webhook-id``). Intake never waits on a receiver: an attempt holds no lock and no
database connection, and a turn's job is one small transaction.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import httpx
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from daemon import notification
from daemon.changes_signal import ChangesSignal
from daemon.config import NotifyConfig, url_label
from daemon.leadership import Leadership
from daemon.signatures import parse_secrets
from storage import notifications as state
from storage.surface import Surface
from storage.writer import Writer

log = logging.getLogger("transcriptd.notify")

T = TypeVar("T")
DAY_S = 86_400.0
TAKE_IN_LIMIT = 1000  # changes taken in per receiver per turn: bounded memory and a short job
TAKE_IN_EVERY_S = 5.0  # changes committed by another process (replay, reconcile) are taken in this late
MIN_TURN_S = 0.05  # commits come faster than this under load: one turn serves many
JITTER = 0.25  # an attempt waits its scheduled delay and up to this much more, at random
FAILING_AFTER = 3  # consecutive failed attempts before /readyz warns about a receiver


class ReceiverState(msgspec.Struct, omit_defaults=True):
    """A receiver as /readyz shows it: what it is owed and how its attempts go."""

    pending: int = 0
    oldest_pending_s: float | None = None
    consecutive_failures: int = 0
    last_status: int | None = None
    last_error: str | None = None
    failing_since: float | None = None
    last_delivered_at: float | None = None


@dataclass
class _Receiver:
    url: str
    label: str
    state: ReceiverState = field(default_factory=ReceiverState)
    inflight: set[str] = field(default_factory=set)  # conversation ids with an attempt in flight
    oldest_pending_at: float | None = None


class Notifier:
    def __init__(
        self,
        config: NotifyConfig,
        surface: Surface,
        writer: Writer,
        signal: ChangesSignal | None = None,
        *,
        poll_s: float = 1.0,
        retention_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        leadership: Leadership | None = None,
    ) -> None:
        self.config = config
        # Replicas on one PostgreSQL: only the leading one sends (None: this process always does).
        self.leadership = leadership
        self.surface = surface
        self.store = surface.notifications
        self.writer = writer
        self.signal = signal
        self.keys = parse_secrets(config.signing_secret)
        self.schedule = config.schedule
        self.poll_s = poll_s
        self.retention_interval_s = retention_interval_s
        self.clock = clock
        self.rand = rand
        labels = [url_label(url) for url in config.receivers]
        self.receivers = {
            url: _Receiver(url, label if labels.count(label) == 1 else f"{label} (#{n})")
            for n, (url, label) in enumerate(zip(config.receivers, labels, strict=True), start=1)
        }
        # Counters, read by the metrics at scrape time.
        self.delivered = 0
        self.retried = 0
        self.failed = 0
        self.pruned = 0
        self._settled: list[state.Attempted] = []
        self._woken = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self._reader: Any = None  # the backend's own connection (surface.read_connection)
        self._reader_lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._last_error: str | None = None
        self._retry_times: list[float] = []  # a heap: when the retries scheduled here are due
        self._more = False  # the last take-in stopped at its limit
        self._taken_upto: int | None = None  # the signal's position at the last take-in
        self._taken_at = 0.0

    # --- what the rest of the daemon reads ---------------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(r.state.pending for r in self.receivers.values())

    @property
    def oldest_pending_at(self) -> float | None:
        oldest = [r.oldest_pending_at for r in self.receivers.values() if r.oldest_pending_at is not None]
        return min(oldest, default=None)

    def states(self) -> dict[str, ReceiverState]:
        now = self.clock()
        for r in self.receivers.values():
            r.state.oldest_pending_s = None if r.oldest_pending_at is None else round(now - r.oldest_pending_at, 3)
        return {r.label: r.state for r in self.receivers.values()}

    def warnings(self) -> list[str]:
        return [
            f"notify receiver {r.label} has failed {r.state.consecutive_failures} attempts in a row "
            f"({r.state.last_error}); {r.state.pending} changes pending"
            for r in self.receivers.values()
            if r.state.consecutive_failures >= FAILING_AFTER
        ]

    # --- lifecycle ---------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something was committed: look for new changes now rather than at the next poll."""
        self._woken.set()

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()

    async def stopped(self) -> None:
        await self._done.wait()

    async def run(self, *, task_status: TaskStatus[Notifier] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send until stopped. Attempts in flight at the stop are abandoned (sent again after the restart);
        the outcomes of finished ones are recorded before this returns."""
        try:
            self._reader = await anyio.to_thread.run_sync(self.surface.read_connection)
            await self._register()
            task_status.started(self)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._retention)
                if self.receivers and self.signal is not None:
                    tg.start_soon(self._watch, self.signal)
                if self.receivers:
                    timeout = httpx.Timeout(self.config.timeout_s)
                    limits = httpx.Limits(max_connections=self.config.max_parallel * len(self.receivers))
                    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
                        self._client = client
                        await self._schedule(tg)
                else:
                    await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self._settled and self.writer.state in ("running", "draining"):
                    await self._settle(self.clock())
                if self._reader is not None:
                    await anyio.to_thread.run_sync(self._reader.close)
            self._done.set()

    async def _register(self) -> None:
        """Give each receiver never seen before its cursor now, before the daemon is ready: it is owed every
        change committed from here on. Left to the first take-in, a replica that does not lead yet (or a
        first turn after the first deliveries) would start it past changes it is owed."""
        if not self.receivers:
            return
        try:
            await self.writer.run_job(partial(self.store.settle_and_take_in, [], list(self.receivers), self.clock(), 0))
        except Exception as exc:  # the storage is failing: the first take-in registers them instead
            log.warning("notify: cannot register the receivers yet: %s: %s", exc.__class__.__name__, exc)

    async def _schedule(self, tg: TaskGroup) -> None:
        while not self._stop.is_set():
            try:
                await self._turn(tg)
            except Exception as exc:
                # A read that failed (storage fault): the sender must not take the daemon down with it.
                message = f"{exc.__class__.__name__}: {exc}"
                if message != self._last_error:
                    log.warning("notify: cannot read what is due: %s (looking again shortly)", message)
                self._last_error = message
            now = self.clock()
            while self._retry_times and self._retry_times[0] <= now:
                heapq.heappop(self._retry_times)
            # Until the next retry this process scheduled, if sooner than the next look.
            wait_s = min(self.poll_s, self._retry_times[0] - now) if self._retry_times else self.poll_s
            with anyio.move_on_after(wait_s):
                await self._woken.wait()
            self._woken = anyio.Event()
            await anyio.sleep(MIN_TURN_S)

    async def _watch(self, signal: ChangesSignal) -> None:
        """Wake the scheduler when a commit records a change (not for commits that record none)."""
        seen = signal.latest
        while not self._stop.is_set() and not signal.closed:
            latest = await signal.wait_beyond(seen, self.poll_s)
            if latest > seen:
                seen = latest
                self.wake()

    async def _turn(self, tg: TaskGroup) -> None:
        now = self.clock()
        leading = self.leadership is None or self.leadership.leading
        # A replica that does not lead still records the attempts it finished while it led.
        if not await self._settle(now, take_in=leading) or not leading:
            return
        for receiver in self.receivers.values():
            free = self.config.max_parallel - len(receiver.inflight)
            if free > 0:
                heads = await self._read(self.store.due, receiver.url, now, free + len(receiver.inflight))
                for change in heads:
                    if free and change.conversation_id not in receiver.inflight:
                        receiver.inflight.add(change.conversation_id)
                        tg.start_soon(self._attempt, receiver, change)
                        free -= 1
            count, oldest = await self._read(self.store.pending_stats, receiver.url)
            receiver.state.pending, receiver.oldest_pending_at = count, oldest

    def _take_in_now(self, now: float) -> bool:
        """Whether this turn takes changes in: a commit recorded some since the last time, the last time
        left more, or a while has passed (another process may have committed some)."""
        latest = self.signal.latest if self.signal is not None else None
        due = self._more or latest is None or latest != self._taken_upto or now - self._taken_at >= TAKE_IN_EVERY_S
        if due:
            self._taken_upto, self._taken_at = latest, now
        return due

    async def _settle(self, now: float, *, take_in: bool = False) -> bool:
        """Record the finished attempts (and take new changes in); False if the storage refused."""
        settled, self._settled = self._settled, []
        receivers = list(self.receivers) if take_in and self._take_in_now(now) else []
        if not settled and not receivers:
            return True  # nothing to write: no job for the writer
        try:
            self._more = await self.writer.run_job(
                partial(self.store.settle_and_take_in, settled, receivers, now, TAKE_IN_LIMIT)
            )
        except Exception as exc:
            self._settled[:0] = settled  # recorded at the next turn
            self._taken_upto = None  # and the take-in made again
            message = f"{exc.__class__.__name__}: {exc}"
            if message != self._last_error:
                log.warning("notify: cannot record attempts or take changes in: %s", message)
            self._last_error = message
            return False
        self._last_error = None
        for attempted in settled:
            self.receivers[attempted.receiver].inflight.discard(attempted.conversation_id)
        return True

    async def _read(self, query: Callable[..., T], *args: object) -> T:
        def run() -> T:
            with self._reader_lock:
                assert self._reader is not None
                if getattr(self._reader, "broken", False) or getattr(self._reader, "closed", False):
                    # PostgreSQL's connection, lost in a server restart or failover: it never comes back by
                    # itself, so without a new one nothing would be sent again until the daemon restarts.
                    self._reader.close()
                    self._reader = self.surface.read_connection()
                    log.info("notify: reconnected its reading connection")
                return query(self._reader, *args)

        return await anyio.to_thread.run_sync(run)

    # --- one attempt -------------------------------------------------------------------------------

    async def _attempt(self, receiver: _Receiver, change: state.Due) -> None:
        try:
            await self._send(receiver, change)
        except Exception as exc:
            # Ours, not the receiver's (the messages could not be read, the body not built): counted as a
            # failed attempt, so the conversation is not stuck in flight and the change is tried again.
            log.exception("notify: attempt of %s failed before it was sent", notification.change_id(change.position))
            self._record(receiver, change, "retry", None, f"{exc.__class__.__name__}: {exc}", self._delay(1, None))

    async def _send(self, receiver: _Receiver, change: state.Due) -> None:
        if not change.in_outbox:
            self._settled.append(
                state.Attempted(
                    receiver.url,
                    change.position,
                    change.conversation_id,
                    "dropped",
                    self.clock(),
                    error="left the outbox before it was sent (conversation erased)",
                )
            )
            self._woken.set()
            return
        messages = None
        if self.config.include_messages:
            messages = await self._read(notification.pushed_messages, change)
        content = notification.body(change, messages)
        del messages
        status: int | None = None
        error: str | None = None
        wait_s: float | None = None
        try:
            assert self._client is not None
            with anyio.fail_after(self.config.timeout_s):
                headers = notification.headers(self.keys, change.position, int(self.clock()), content)
                # Streamed and never read: a receiver's answer body, however large, costs nothing here.
                async with self._client.stream("POST", receiver.url, content=content, headers=headers) as answer:
                    status = answer.status_code
                    if status in (429, 503):
                        wait_s = notification.retry_after_s(answer.headers.get("retry-after"), self.clock())
        except TimeoutError:
            error = f"no answer within {self.config.timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if status is not None and 200 <= status < 300:
            self._record(receiver, change, "delivered", status, None, 0.0)
            return
        if status is not None:
            error = f"answered {status}"
        self._record(receiver, change, "retry", status, error, self._delay(change.attempts + 1, wait_s))

    def _delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after  # what the receiver asked for: no less, and no jitter needed
        base = self.schedule[min(failures, len(self.schedule)) - 1]
        return base * (1 + JITTER * self.rand())

    def _record(
        self,
        receiver: _Receiver,
        change: state.Due,
        outcome: str,
        status: int | None,
        error: str | None,
        delay_s: float,
    ) -> None:
        now = self.clock()
        s = receiver.state
        s.last_status = status
        if outcome == "delivered":
            self.delivered += 1
            s.consecutive_failures, s.last_error, s.failing_since, s.last_delivered_at = 0, None, None, now
        else:
            if s.consecutive_failures == 0:
                s.failing_since = now
            s.consecutive_failures += 1
            s.last_error = error
            if outcome == "retry" and now + delay_s > change.started_at + self.config.max_age_s:
                outcome = "failed"
            if outcome == "failed":
                self.failed += 1
                log.warning(
                    "notify: gave up change %s of conversation %r for %s after %d attempts: %s",
                    notification.change_id(change.position),
                    change.conversation_id,
                    receiver.label,
                    change.attempts + 1,
                    error,
                )
            else:
                self.retried += 1
                heapq.heappush(self._retry_times, now + delay_s)
        self._settled.append(
            state.Attempted(
                receiver.url, change.position, change.conversation_id, outcome, now, status, error, now + delay_s
            )
        )
        self._woken.set()

    # --- retention ---------------------------------------------------------------------------------

    async def _retention(self) -> None:
        if self.config.keep_days <= 0:
            return
        while not self._stop.is_set():
            cutoff = self.clock() - self.config.keep_days * DAY_S
            try:
                oldest = await self._read(self.store.oldest_change_at)
                # Read first: no job for the writer (which would cut a batch held open short) when
                # nothing is that old.
                while oldest is not None and oldest < cutoff and not self._stop.is_set():
                    pruned = await self.writer.run_job(partial(self.store.prune, cutoff, list(self.receivers)))
                    self.pruned += pruned
                    if not pruned:
                        break
            except Exception:
                log.exception("notify: pruning delivered changes failed (tried again later)")
            with anyio.move_on_after(self.retention_interval_s):
                await self._stop.wait()
