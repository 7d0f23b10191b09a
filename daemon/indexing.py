"""The search index's background work in the daemon: turn it on or off as ``search.enabled`` says, then fill
in what it lacks (the messages stored before it existed, see storage.search_index) in short writer jobs,
logging how far it is. Intake goes on between the steps; searches meanwhile say they are partial."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from storage.errors import WriterClosed
from storage.surface import SearchIndex
from storage.writer import Writer

log = logging.getLogger("transcriptd.search")

PROGRESS_EVERY_S = 5.0


class Indexer:
    def __init__(self, writer: Writer, search_index: SearchIndex[Any], *, enabled: bool) -> None:
        self.writer = writer
        self.search_index = search_index
        self.enabled = enabled
        self._scope = anyio.CancelScope()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            # Before start-up completes: a search never sees an index the setting has turned off.
            if await self.writer.run_job(lambda conn: self.search_index.configure(conn, enabled=self.enabled)):
                log.info("search index turned %s", "on: rebuilding it" if self.enabled else "off and emptied")
            task_status.started()
            if self.enabled:
                try:
                    await self._backfill()
                except WriterClosed:
                    return  # shutting down: the next start goes on from where this one stopped

    async def _backfill(self) -> None:
        state = await self.writer.run_job(self.search_index.state)
        if state.complete:
            return
        total, done = state.pending, 0
        log.info("search index: %d messages to index", total)
        started = reported = time.monotonic()
        while indexed := await self.writer.run_job(self.search_index.step):
            done += indexed
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                reported = time.monotonic()
                log.info("search index: %d of %d messages (%.0f%%)", done, total, 100 * done / max(total, 1))
            await anyio.lowlevel.checkpoint()  # deliveries are queued between the jobs anyway: let the loop breathe
        log.info("search index complete: %d messages in %.1f s", done, time.monotonic() - started)

    def stop(self) -> None:
        self._scope.cancel()
