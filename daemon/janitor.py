"""Retention inside the daemon: conversations older than ``storage.retention_days`` go, a few at a time.

Each batch is a job on the writer's own connection, between two commits: intake never waits for more
than one small transaction, and the janitor never waits on a lock the writer holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from daemon.cache import PrefixTTLCache
from storage.surface import Retention
from storage.writer import Writer

log = logging.getLogger("transcriptd.retention")

DAY_S = 86_400.0


class Janitor:
    def __init__(
        self,
        writer: Writer,
        cache: PrefixTTLCache,
        retention_days: float,
        retention: Retention[Any],
        *,
        interval_s: float = 3600.0,
        batch: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.cache = cache
        self.retention = retention
        self.retention_days = retention_days
        self.interval_s = interval_s
        self.batch = batch
        self.clock = clock
        self.removed = 0
        self._stop = anyio.Event()

    async def run(self, *, task_status: TaskStatus[Janitor] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        if self.retention_days <= 0:
            return  # keep everything: the default
        while not self._stop.is_set():
            try:
                await self.sweep()
            except Exception:
                # Retention is housekeeping: a failed sweep (storage fault) is retried at the next one.
                log.exception("retention sweep failed")
            with anyio.move_on_after(self.interval_s):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def sweep(self) -> int:
        """Remove every conversation whose last activity is older than the retention; how many went."""
        cutoff = self.clock() - self.retention_days * DAY_S
        removed = 0
        while not self._stop.is_set():
            count = await self.writer.run_job(lambda conn: self.retention.prune_batch(conn, cutoff, self.batch))
            if not count:
                break
            removed += count
        if removed:
            # Cached reads of what was removed would otherwise outlive it by up to a TTL.
            self.cache.clear()
            self.removed += removed
            log.info("retention: removed %d conversations last active before %s", removed, time.ctime(cutoff))
        return removed
