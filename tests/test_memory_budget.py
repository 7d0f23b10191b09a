"""The in-flight budget bounds the memory a backlog takes, and that memory goes back once it drains.

A real ``transcriptd serve`` (enqueued acks, ``ingest.max_inflight_mib = 16``) whose writer is held back
by another process holding the database's write lock: deliveries, each for a conversation of its own,
pile up in memory until intake answers 503. 16 MiB is ~6,000 small Tavus events (~230 bytes, the costliest
case per byte) or ~140 100-turn transcripts (~40 KB): a few seconds of sending, and large enough that the
daemon's own noise (a few MiB) does not hide a budget that counts wrong. Counted as before (2 x body +
256 bytes), the same budget admitted ~23,000 small events, about 60 MiB. The daemon's SQLite page cache
is kept at 2 MiB so that storing the backlog cannot pass for memory the backlog kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from daemon.memory import Trimmer, malloc_trim
from tests.daemon_process import WEBHOOK, Daemon, managed, rows, start_daemon
from tests.fault_tools import RssSampler, rss_kib, transaction_elsewhere
from tests.payloads import encode, envelope, transcription_ready

BUDGET_MIB = 16
# Stated in docs/operations.md: a backlog grows the RSS by at most about twice the budget, and after large
# deliveries are stored, at most the budget stays (malloc_trim gives the rest back).
RSS_FACTOR = 2.0
KEPT_AFTER_DRAIN = 1.0
ENV = {"TRANSCRIPTD_INGEST_MAX_INFLIGHT_MIB": str(BUDGET_MIB), "TRANSCRIPTD_STORAGE_CACHE_SIZE_MIB": "2"}
SENDERS = 4


def small_event(conversation_id: str) -> bytes:
    return encode(envelope(conversation_id, "system.replica_joined", {}))


def transcript(conversation_id: str) -> bytes:
    return encode(transcription_ready(conversation_id, turns=100))


@dataclass
class Flood:
    """Senders posting one body per new conversation until ``enough_503`` answers were 503, or ``limit``
    bodies were sent, or ``timeout_s`` has passed."""

    daemon: Daemon
    prefix: str
    body: Callable[[str], bytes]
    limit: int
    enough_503: int = 200
    timeout_s: float = 120.0
    statuses: dict[int, int] = field(default_factory=dict)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> Flood:
        deadline = time.monotonic() + self.timeout_s
        threads = [threading.Thread(target=self._send, args=(deadline,)) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.timeout_s + 10)
        return self

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    def _claim(self, deadline: float) -> str | None:
        with self._lock:
            done = self.statuses.get(503, 0) >= self.enough_503 or self._next >= self.limit
            if done or time.monotonic() > deadline:
                return None
            self._next += 1
            return f"{self.prefix}-{self._next:06d}"

    def _send(self, deadline: float) -> None:
        with httpx.Client(base_url=self.daemon.base_url, timeout=10, trust_env=False) as client:
            while (conversation_id := self._claim(deadline)) is not None:
                status = client.post(WEBHOOK, content=self.body(conversation_id)).status_code
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1


def rss_mib(daemon: Daemon, settle_s: float = 1.0) -> float:
    time.sleep(settle_s)
    rss = rss_kib(daemon.pid)
    assert rss is not None
    return rss / 1024


def backlog(daemon: Daemon, prefix: str, body: Callable[[str], bytes], limit: int) -> tuple[Flood, float]:
    """Hold the writer back and send until 503s come; release, wait until all is stored. The flood and
    the peak RSS (MiB) while it was held."""
    with (
        transaction_elsewhere(daemon.sqlite_path, "BEGIN IMMEDIATE"),
        RssSampler(daemon.pid, interval_s=0.02) as sampler,
    ):
        flood = Flood(daemon, prefix, body, limit).run()
        peak = max(sampler.peak_kib, rss_kib(daemon.pid) or 0) / 1024
    assert flood.statuses.get(503, 0) >= flood.enough_503, flood.statuses  # the budget was reached
    deadline = time.monotonic() + 60
    while rows(daemon.db_path, "SELECT count(*) FROM conversations WHERE id LIKE ?", (f"{prefix}-%",))[0][0] < (
        flood.accepted
    ):
        assert time.monotonic() < deadline, f"{prefix}: the backlog was not stored within 60 s"
        time.sleep(0.2)
    return flood, peak


def warm_up(daemon: Daemon, body: Callable[[str], bytes], count: int) -> None:
    """Every path a delivery takes (and the allocator) warmed up, stored as usual."""
    warm = Flood(daemon, "warm", body, count, enough_503=1).run()
    assert warm.statuses == {202: count}, warm.statuses


def test_a_backlog_of_small_deliveries_stays_within_the_stated_factor_of_the_budget(tmp_path: Path) -> None:
    """Twice over: what the first backlog leaves in Python's allocator is reused by the next one, not
    added to (small objects live in arenas that are kept while any object in them lives)."""
    db_path = tmp_path / "transcriptd.db"
    with managed(start_daemon(tmp_path, db_path, ack="enqueued", env=ENV)) as daemon:
        warm_up(daemon, small_event, 500)
        baseline = rss_mib(daemon)
        for round_ in ("first", "second"):
            flood, peak = backlog(daemon, round_, small_event, limit=30_000)
            growth = peak - baseline
            print(f"{round_}: +{growth:.1f} MiB for {flood.accepted} small deliveries held ({BUDGET_MIB} MiB budget)")
            assert growth <= RSS_FACTOR * BUDGET_MIB, f"{round_}: +{growth:.1f} MiB for a {BUDGET_MIB} MiB budget"
        after = rss_mib(daemon) - baseline
        assert after <= RSS_FACTOR * BUDGET_MIB, f"+{after:.1f} MiB after both backlogs were stored"


def test_a_backlog_of_transcripts_gives_its_memory_back_once_stored(tmp_path: Path) -> None:
    db_path = tmp_path / "transcriptd.db"
    with managed(start_daemon(tmp_path, db_path, ack="enqueued", env=ENV)) as daemon:
        warm_up(daemon, transcript, 40)
        baseline = rss_mib(daemon)
        flood, peak = backlog(daemon, "held", transcript, limit=2_000)
        growth = peak - baseline
        assert growth <= RSS_FACTOR * BUDGET_MIB, f"+{growth:.1f} MiB for a {BUDGET_MIB} MiB budget"
        after = rss_mib(daemon, settle_s=2.0) - baseline
        print(f"+{growth:.1f} MiB for {flood.accepted} transcripts held; +{after:.1f} MiB once stored")
        assert after <= KEPT_AFTER_DRAIN * BUDGET_MIB, f"+{after:.1f} MiB still held after the backlog was stored"


@pytest.mark.anyio
async def test_the_trimmer_trims_after_large_backlogs_only_and_not_too_often() -> None:
    if not malloc_trim():
        pytest.skip("no malloc_trim here (not glibc)")
    trimmer = Trimmer(min_backlog_bytes=1_000, min_interval_s=0.3)

    async def trims_become(count: int) -> None:
        with anyio.fail_after(5):
            while trimmer.trims < count:  # noqa: ASYNC110 (another task's state)
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        await tg.start(trimmer.run)
        trimmer.drained(999)  # a small backlog: not worth a trim
        await anyio.sleep(0.1)
        assert trimmer.trims == 0
        trimmer.drained(1_000)
        await trims_become(1)
        trimmer.drained(50_000)
        await anyio.sleep(0.1)
        assert trimmer.trims == 1  # the next one waits for min_interval_s
        await trims_become(2)
        trimmer.stop()
