"""WAL checkpoints off the commit path, and a WAL that shrinks back once readers let go.

SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold, so one sender in
every few dozen waits for a few MB to be copied into the database file and fsynced: that is the
p99 of the ack. Here a separate connection checkpoints in its own thread (PASSIVE: it never blocks
the writer), and the writer's own automatic checkpoint stays only as a backstop at a much larger size.

A checkpoint follows commits (``notify``), at most once per ``interval_s``, so each one is small:
its fsync of the database file is short, and a commit's fsync of the WAL rarely queues behind a long
one. Side by side at 64 senders, checkpoints every 20-50 ms instead of every 250 ms lowered the ack
p99 in four runs of five, by up to a third. A daemon with nothing to commit does no checkpoint at all.

A reader that holds a read transaction (an operator's ``sqlite3`` shell left open, a long backup) stops
every checkpoint at its snapshot, and the WAL grows with every commit. SQLite never gives that space
back by itself: the WAL file keeps its largest size until a clean stop. So while the WAL is pinned or
larger than ``keep_bytes`` the checkpointer looks again every ``recheck_s``, commits or not, and once a
checkpoint has copied everything it runs a TRUNCATE checkpoint without waiting (busy timeout 0: it
never holds the writer up for long, and simply tries again later if a reader is still there). The
writer's ``journal_size_limit`` does the same at the first commit that restarts the WAL.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from storage.connection import WAL_KEEP_BYTES, open_checkpointer

log = logging.getLogger("transcriptd.checkpointer")

# How long checkpoints may fall short before readiness warns. A checkpoint falls short only when a reader
# holds a snapshot older than the last commit; our own reads end within milliseconds, so 10 s is someone else.
PIN_WARN_S = 10.0


class Checkpointer:
    def __init__(
        self,
        path: str | Path,
        *,
        interval_s: float = 0.02,
        keep_bytes: int = WAL_KEEP_BYTES,
        recheck_s: float = 1.0,
        pin_warn_s: float = PIN_WARN_S,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.interval_s = interval_s
        self.keep_bytes = keep_bytes
        self.recheck_s = recheck_s
        self.pin_warn_s = pin_warn_s
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self.checkpoints = 0
        self.truncations = 0
        # Since when (``clock()``) checkpoints have not copied the whole WAL; None when the last one did.
        self.pinned_since: float | None = None
        self._last_truncate_at = -float("inf")
        self._stop = anyio.Event()
        self._committed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[Checkpointer] = anyio.TASK_STATUS_IGNORED) -> None:
        conn = await anyio.to_thread.run_sync(
            functools.partial(open_checkpointer, self.path, busy_timeout_ms=self.busy_timeout_ms)
        )
        task_status.started(self)
        try:
            while True:
                if self._needs_recheck():
                    # Pinned or oversized: look again soon even if nothing is committed, or an idle
                    # daemon would keep a huge WAL after the reader has gone.
                    with anyio.move_on_after(self.recheck_s):
                        await self._committed.wait()
                else:
                    await self._committed.wait()  # stop() sets it too
                self._committed = anyio.Event()
                await anyio.to_thread.run_sync(self._checkpoint, conn)
                if self._stop.is_set():
                    break  # that was the last one, after the writer's last commit
                with anyio.move_on_after(self.interval_s):
                    await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close)

    def notify(self) -> None:
        """A commit happened (called on the event loop): the WAL has frames to copy."""
        self._committed.set()

    def stop(self) -> None:
        self._stop.set()
        self._committed.set()

    def wal_bytes(self) -> int:
        """The size of the WAL file now (0 when there is none)."""
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return 0

    def pinned_s(self) -> float:
        """How long checkpoints have not been able to copy the whole WAL (0 when the last one did)."""
        since = self.pinned_since
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def warning(self) -> str | None:
        """Why the WAL is growing, once a reader has held it for ``pin_warn_s``."""
        pinned = self.pinned_s()
        if pinned < self.pin_warn_s:
            return None
        size = self.wal_bytes()
        return (
            f"the WAL cannot be checkpointed: a read transaction has held an old snapshot for {pinned:.0f} s, "
            f"and the WAL has grown to {size / 2**20:.0f} MiB (it shrinks once that reader ends)"
        )

    def _needs_recheck(self) -> bool:
        return self.pinned_since is not None or self.wal_bytes() > self.keep_bytes

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
        if frames < 0:
            return  # another checkpoint was running: nothing learnt
        now = self.clock()
        if done < frames:
            if self.pinned_since is None:
                self.pinned_since = now
            return
        if self.pinned_since is not None:
            held_s = now - self.pinned_since
            # Under intake our own reads hold it for moments: only a pin that was warned about is news.
            level = logging.INFO if held_s >= self.pin_warn_s else logging.DEBUG
            log.log(level, "the WAL is checkpointed again after %.1f s held by a reader", held_s)
            self.pinned_since = None
        if self.wal_bytes() > self.keep_bytes and now - self._last_truncate_at >= self.recheck_s:
            self._last_truncate_at = now
            self._truncate(conn)

    def _truncate(self, conn: sqlite3.Connection) -> None:
        before = self.wal_bytes()
        try:
            # No busy wait: TRUNCATE takes the write lock, and the writer must not queue behind a reader.
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        except sqlite3.Error as exc:
            log.warning("truncating the WAL failed (will try again): %s", exc)
            return
        if not busy:
            self.truncations += 1
            log.info("WAL truncated from %d MiB", before // 2**20)
