"""The daemon's own reconciler: every ``reconcile.interval_s``, fetch back what the webhooks missed.

Owned by the lifespan's task group. One pass at a time; each pass, for each source with an API key,
takes the conversations that started here and have no transcript after ``reconcile.grace_s``, and the
vendor's ended conversations in the last ``reconcile.window_s`` that are missing here or incomplete,
fetches them, and submits their deliveries through the actors like any webhook: the in-flight budget
refuses them when intake is busy (the pass stops, the next one retries). A vendor that fails is logged,
counted and shown in ``/readyz``; it never stops the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from daemon.actors import ActorRegistry
from daemon.config import Config
from daemon.errors import Unavailable
from daemon.inflight import InFlight
from daemon.leadership import Leadership
from daemon.metrics import Metrics
from daemon.reconcile import deliveries_of, local_state, vendor_http, waiting
from daemon.sources import SOURCES, Source
from daemon.sources.model import Fetched, VendorClient
from daemon.vendor_http import HttpPolicy, VendorApiError, VendorHttp
from storage.surface import surface_for

log = logging.getLogger("transcriptd.reconcile")

# An ended conversation whose transcript the vendor still does not have after this many fetches is left
# alone until it leaves the window (a call nobody spoke in has none, ever).
EMPTY_FETCHES = 3


class SourceState(msgspec.Struct, omit_defaults=True):
    """What ``/readyz`` shows of one source's reconcile."""

    passes: int = 0
    fetched: int = 0
    recovered_messages: int = 0
    errors: int = 0
    last_pass_at: float | None = None
    last_error: str | None = None  # the last pass's, cleared by a pass without one


@dataclass(slots=True)
class _Vendor:
    source: Source[Any]
    http: VendorHttp
    client: VendorClient
    state: SourceState
    # Fetched, ended at the vendor, nothing more to get: not fetched again while in the window.
    settled: dict[str, float]
    # Fetched ended but without a transcript, how many times: the vendor may still be writing it.
    empty: dict[str, int]


class Reconciler:
    def __init__(
        self,
        config: Config,
        registry: ActorRegistry,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        leadership: Leadership | None = None,
    ) -> None:
        self.config = config.reconcile
        # Replicas on one PostgreSQL: only the leading one polls the vendors (None: this process always does).
        self._leadership = leadership
        self._surface = surface_for(config.storage.target)
        self._read_errors: tuple[type[Exception], ...] = (OSError, *self._surface.driver_errors)
        self._busy_timeout_ms = config.storage.busy_timeout_ms
        self._ack_timeout_s = config.ingest.ack_timeout_s
        self._webhooks = config.webhooks
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._stopping = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._vendors: list[_Vendor] = []

    @property
    def states(self) -> dict[str, SourceState]:
        return {vendor.source.name: vendor.state for vendor in self._vendors}

    async def run(self, *, task_status: TaskStatus[Reconciler] = anyio.TASK_STATUS_IGNORED) -> None:
        policy = HttpPolicy(
            timeout_s=self.config.request_timeout_s,
            max_attempts=self.config.max_attempts,
            max_concurrency=self.config.max_concurrent_requests,
        )
        async with AsyncExitStack() as stack:
            if self.config.interval_s > 0:
                for source in SOURCES:
                    http = vendor_http(source, self._webhooks, policy)
                    if http is None or source.api is None:
                        continue
                    stack.push_async_callback(http.aclose)
                    self._vendors.append(_Vendor(source, http, source.api.build(http), SourceState(), {}, {}))
            task_status.started(self)
            if not self._vendors:
                return
            names = ", ".join(vendor.source.name for vendor in self._vendors)
            log.info("reconcile: every %g s for %s", self.config.interval_s, names)
            while not self._stopping.is_set():
                with anyio.move_on_after(self.config.interval_s):
                    await self._stopping.wait()
                if self._stopping.is_set():
                    break
                if self._leadership is not None and not self._leadership.leading:
                    continue
                with anyio.CancelScope() as self._scope:
                    await self.run_pass()
                self._scope = None

    def stop(self) -> None:
        """End the loop, and the pass under way (what it submitted stays with the actors)."""
        self._stopping.set()
        if self._scope is not None:
            self._scope.cancel()

    async def run_pass(self) -> None:
        for vendor in self._vendors:
            await self._pass(vendor)

    async def _pass(self, vendor: _Vendor) -> None:
        name, state = vendor.source.name, vendor.state
        now = self._clock()
        since = now - self.config.window_s
        for cid, at in list(vendor.settled.items()):
            if at < since:
                del vendor.settled[cid]
                vendor.empty.pop(cid, None)
        error: str | None = None
        try:
            wanted = await self._wanted(vendor, now, since)
            for cid in wanted[: self.config.max_per_pass]:
                try:
                    fetched = await vendor.client.fetch(cid)
                except VendorApiError as exc:
                    if exc.retryable:
                        raise  # the vendor is failing: the next pass tries again
                    # This conversation only (the vendor does not know it, or refuses it): the others go
                    # on, and it is not asked for again while in the window.
                    error = str(exc)
                    vendor.settled[cid] = now
                    continue
                state.fetched += 1
                self._metrics.reconcile_fetched.labels(name).inc()
                if not await self._store(vendor, fetched):
                    break  # intake is busy: the next pass takes the rest
        except VendorApiError as exc:
            error = str(exc)
        except self._read_errors as exc:  # the database could not be read
            error = f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:
            log.exception("reconcile: %s pass failed", name)
            error = f"{exc.__class__.__name__}: {exc}"
        state.passes += 1
        state.last_pass_at = now
        state.last_error = error
        self._metrics.reconcile_passes.labels(name).inc()
        if error is not None:
            state.errors += 1
            self._metrics.reconcile_errors.labels(name).inc()
            log.warning("reconcile: %s: %s", name, error)

    async def _wanted(self, vendor: _Vendor, now: float, since: float) -> list[str]:
        """Conversation ids to fetch: waiting here past the grace period, then the vendor's ended ones
        missing or incomplete here."""
        name = vendor.source.name
        listed, going = [], set()
        async for item in vendor.client.recent(since):
            if item.ended:
                listed.append(item.conversation_id)
            else:
                going.add(item.conversation_id)  # still going at the vendor: nothing final to fetch yet

        def read() -> list[str]:
            with closing(self._surface.read_connection(busy_timeout_ms=self._busy_timeout_ms)) as conn:
                stale = waiting(
                    conn,
                    name,
                    started_before=now - self.config.grace_s,
                    since=since,
                    limit=self.config.max_per_pass,
                )
                here = local_state(conn, name, listed, self._surface.erasure)
            stale = [cid for cid in stale if cid not in going]
            return [*stale, *(cid for cid in listed if cid not in here or not here[cid].complete)]

        wanted = await anyio.to_thread.run_sync(read)
        return [cid for cid in dict.fromkeys(wanted) if cid not in vendor.settled]

    async def _store(self, vendor: _Vendor, fetched: Fetched) -> bool:
        """Submit the fetched conversation's deliveries and wait for their commit; False if intake has no
        room for them now."""
        name = vendor.source.name
        records, problems = deliveries_of(vendor.source, self._webhooks, fetched, self._clock())
        for problem in problems:
            log.warning("reconcile: %s conversation %r: %s", name, fetched.conversation_id, problem)
        inserted, complete = 0, True
        transcript = any(record.rows for record in records)
        for record in records:
            delivery = InFlight(record, awaited=True)
            try:
                self._registry.submit(delivery)
            except Unavailable as exc:
                log.info("reconcile: %s: %s; the next pass goes on", name, exc.message)
                return False
            with anyio.move_on_after(self._ack_timeout_s):
                await delivery.done.wait()
            if delivery.result is None:  # failed, or not committed within ingest.ack_timeout_s: next pass
                complete = False
                continue
            inserted += delivery.result.inserted
        if inserted:
            vendor.state.recovered_messages += inserted
            self._metrics.reconcile_messages.labels(name).inc(inserted)
            log.info("reconcile: %s conversation %r: %d messages recovered", name, fetched.conversation_id, inserted)
        if fetched.ended and complete:
            cid = fetched.conversation_id
            empty = 0 if transcript else vendor.empty.get(cid, 0) + 1
            vendor.empty[cid] = empty
            if empty == 0 or empty >= EMPTY_FETCHES:
                vendor.settled[cid] = self._clock()
        return True
