"""WAL checkpoints off the commit path.

SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold, so one sender in
every few dozen waits for a few MB to be copied into the database file and fsynced: that is the
p99 of the ack. Here a separate connection checkpoints in its own thread (PASSIVE: it never blocks
the writer), and the writer's own automatic checkpoint stays only as a backstop at a much larger size.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from storage.connection import open_checkpointer

log = logging.getLogger("transcriptd.checkpointer")


class Checkpointer:
    def __init__(self, path: str | Path, *, interval_s: float = 0.25) -> None:
        self.path = path
        self.interval_s = interval_s
        self.checkpoints = 0
        self._stop = anyio.Event()

    async def run(self, *, task_status: TaskStatus[Checkpointer] = anyio.TASK_STATUS_IGNORED) -> None:
        conn = await anyio.to_thread.run_sync(open_checkpointer, self.path)
        task_status.started(self)
        try:
            while not self._stop.is_set():
                with anyio.move_on_after(self.interval_s):
                    await self._stop.wait()
                await anyio.to_thread.run_sync(self._checkpoint, conn)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close)

    def stop(self) -> None:
        self._stop.set()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("checkpoint failed (the writer's own checkpoint remains): %s", exc)
            return
        if frames > 0 and done == frames:
            self.checkpoints += 1
        if frames:
            log.debug("checkpoint: busy=%s frames=%s checkpointed=%s", busy, frames, done)
