"""Prometheus metrics: one registry per app, names with the ``transcriptd_`` prefix and base units.

No label carries a conversation id: label values come from small fixed sets (event types we know,
outcomes, error codes), so the number of series stays bounded whatever the senders do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from daemon.auth import check_bearer_any
from daemon.cache import PrefixTTLCache
from daemon.notifier import Notifier
from daemon.sources import EVENT_TYPES
from storage.deliveries import WriteResult

KNOWN_EVENT_TYPES = EVENT_TYPES  # of every registered source
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
ROW_BUCKETS = (1, 10, 100, 500, 1_000, 2_500, 5_000, 10_000, 20_000)


class _CacheCollector(Collector):
    """Reads the cache's own counters at scrape time: nothing is added to the read path."""

    def __init__(self, cache: PrefixTTLCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value, help_ in (
            ("hits", self.cache.hits, "Reads answered from the cache"),
            ("misses", self.cache.misses, "Reads that went to the database"),
            ("evictions", self.cache.evictions, "Cached reads evicted after a commit touched their conversation"),
        ):
            yield CounterMetricFamily(f"transcriptd_cache_{name}", help_, value=value)


class _CountCollector(Collector):
    """One counter read at scrape time from the part that keeps it."""

    def __init__(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.help, value=self.read())


class Metrics:
    def __init__(self, scrape_tokens: tuple[str, ...] = ()) -> None:
        """``scrape_tokens``: a scrape needs ``Authorization: Bearer`` with one of them when any is set
        (``api.token`` and ``api.metrics_token``); /metrics is open when none is."""
        self.scrape_tokens = scrape_tokens
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.deliveries = Counter(
            "transcriptd_deliveries",
            "Deliveries answered, by event type and outcome",
            ["event_type", "outcome"],
            registry=r,
        )
        self.messages = Counter(
            "transcriptd_messages", "Messages received, by what became of them", ["outcome"], registry=r
        )
        self.dedup_hits = Counter(
            "transcriptd_dedup_hits", "Deliveries seen before (same key): nothing stored again", registry=r
        )
        self.rejected = Counter(
            "transcriptd_rejected_requests", "Requests answered 4xx or 5xx, by reason", ["reason"], registry=r
        )
        self.client_disconnected = Counter(
            "transcriptd_client_disconnected",
            "Requests whose sender closed the connection before its body was read",
            registry=r,
        )
        self.ack_latency = Histogram(
            "transcriptd_ack_latency_seconds",
            "From the request's arrival to its answer, for deliveries taken",
            ["ack"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_latency = Histogram(
            "transcriptd_commit_duration_seconds",
            "Writing and committing one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_rows = Histogram(
            "transcriptd_commit_rows", "Message rows inserted or updated by one commit", buckets=ROW_BUCKETS, registry=r
        )
        self.live_actors = Gauge("transcriptd_live_actors", "Conversation actors alive", registry=r)
        self.mailbox_depth = Gauge(
            "transcriptd_mailbox_depth", "Deliveries waiting in conversation mailboxes", registry=r
        )
        self.oldest_pending = Gauge(
            "transcriptd_oldest_pending_delivery_age_seconds",
            "Age of the oldest delivery taken and not yet stored (0 when none)",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "transcriptd_inflight_bytes", "Memory held by deliveries not yet stored", registry=r
        )
        self.wal_bytes = Gauge("transcriptd_wal_bytes", "Size of the SQLite WAL file", registry=r)
        self.wal_pinned = Gauge(
            "transcriptd_wal_pinned_seconds",
            "How long checkpoints have not been able to copy the whole WAL, held by a reader (0 when they can)",
            registry=r,
        )
        # Reconcile, by source (daemon.reconciler): what the vendors' APIs gave back that webhooks missed.
        self.reconcile_passes = Counter(
            "transcriptd_reconcile_passes", "Reconcile passes run, by source", ["source"], registry=r
        )
        self.reconcile_fetched = Counter(
            "transcriptd_reconcile_conversations_fetched",
            "Conversations fetched from a vendor's API by reconcile, by source",
            ["source"],
            registry=r,
        )
        self.reconcile_messages = Counter(
            "transcriptd_reconcile_messages_recovered",
            "Messages reconcile stored that no webhook had delivered, by source",
            ["source"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "transcriptd_reconcile_errors",
            "Reconcile passes that failed (vendor API, database), by source",
            ["source"],
            registry=r,
        )
        # Children of labelled metrics on the per-request path, so no label lookup is paid per request.
        self._deliveries: dict[tuple[str, str], Any] = {}
        self._messages = tuple(self.messages.labels(n) for n in ("inserted", "updated", "duplicate", "rejected"))
        self.ack_durable = self.ack_latency.labels("durable")
        self.ack_enqueued = self.ack_latency.labels("enqueued")

    def watch(
        self,
        *,
        live_actors: Callable[[], float],
        mailbox_depth: Callable[[], float],
        oldest_pending_at: Callable[[], float | None],
        inflight_bytes: Callable[[], float],
        cache: PrefixTTLCache,
        wal_bytes: Callable[[], float] | None = None,
        wal_pinned_s: Callable[[], float] | None = None,
    ) -> None:
        """Gauges computed at scrape time from the running parts."""
        if wal_bytes is not None:
            self.wal_bytes.set_function(wal_bytes)
        if wal_pinned_s is not None:
            self.wal_pinned.set_function(wal_pinned_s)
        self.live_actors.set_function(live_actors)
        self.mailbox_depth.set_function(mailbox_depth)
        self.inflight_bytes.set_function(inflight_bytes)

        def oldest_age() -> float:
            oldest = oldest_pending_at()
            return 0.0 if oldest is None else max(0.0, time.time() - oldest)

        self.oldest_pending.set_function(oldest_age)
        self.registry.register(_CacheCollector(cache))

    def watch_erasure(self, *, dropped: Callable[[], float]) -> None:
        """Deliveries dropped because their conversation was erased, in either ack mode (the writer counts)."""
        self.registry.register(
            _CountCollector(
                "transcriptd_erased_deliveries_dropped",
                "Deliveries for an erased conversation: answered 2xx, nothing stored",
                dropped,
            )
        )

    def watch_notify(self, notifier: Notifier) -> None:
        """Outbound webhooks (daemon.notifier), read at scrape time, summed over the receivers."""
        for name, help_, read in (
            ("delivered", "Changes delivered to a receiver (answered 2xx)", lambda: notifier.delivered),
            ("retried", "Attempts that failed and will be made again", lambda: notifier.retried),
            (
                "failed",
                "Changes given up after notify.max_age_s (see transcriptd notifications list)",
                lambda: notifier.failed,
            ),
        ):
            self.registry.register(_CountCollector(f"transcriptd_notify_{name}", help_, read))
        Gauge(
            "transcriptd_notify_pending",
            "Changes owed to a receiver, not delivered nor given up",
            registry=self.registry,
        ).set_function(lambda: notifier.pending)

        def oldest_age() -> float:
            oldest = notifier.oldest_pending_at
            return 0.0 if oldest is None else max(0.0, time.time() - oldest)

        Gauge(
            "transcriptd_notify_oldest_pending_age_seconds",
            "Age of the oldest change owed to a receiver (0 when none)",
            registry=self.registry,
        ).set_function(oldest_age)

    def delivery(self, event_type: str, outcome: str, result: WriteResult | None, rejected: int = 0) -> None:
        """Count one answered delivery. Called per request: the labelled children are looked up once."""
        kind = event_type if event_type in KNOWN_EVENT_TYPES else "other"
        counter = self._deliveries.get((kind, outcome))
        if counter is None:
            counter = self._deliveries[kind, outcome] = self.deliveries.labels(kind, outcome)
        counter.inc()
        if result is not None:
            if result.duplicate_delivery:
                self.dedup_hits.inc()
            inserted, updated, duplicate, rejected_ = self._messages
            for child, count in (
                (inserted, result.inserted),
                (updated, result.updated),
                (duplicate, result.duplicates),
                (rejected_, result.rejected),
            ):
                if count:
                    child.inc(count)
        elif rejected:
            self._messages[3].inc(rejected)

    def commit(self, rows: int, seconds: float) -> None:
        self.commit_latency.observe(seconds)
        self.commit_rows.observe(rows)

    async def serve(self, request: Request) -> Response:
        check_bearer_any(request, self.scrape_tokens)
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8")
