"""Memory given back to the system once a backlog of deliveries has drained.

glibc's malloc keeps the memory freed by a drained backlog (the bodies, a mailbox's blocks: everything
over 512 bytes that Python hands to malloc) in its heaps for reuse, so without a trim the process stays
at its peak RSS. ``malloc_trim(0)`` returns those free pages. It is called off the event loop, once a
backlog of at least ``min_backlog_bytes`` is fully stored, at most every ``min_interval_s``. Elsewhere
(musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import time
from collections.abc import Callable
from functools import cache

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger("transcriptd.memory")

MIN_BACKLOG_BYTES = 8 * 1024 * 1024


@cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def malloc_trim() -> bool:
    """Return free heap memory to the system (glibc); False where that is not available."""
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class Trimmer:
    """Trims after each drained backlog. ``drained(peak_bytes)`` is called on the event loop by the actor
    registry when its in-flight bytes come back to zero."""

    def __init__(
        self,
        *,
        min_backlog_bytes: int = MIN_BACKLOG_BYTES,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_backlog_bytes = min_backlog_bytes
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.trims = 0
        self._due = anyio.Event()
        self._stop = anyio.Event()
        self._last = -float("inf")

    def drained(self, peak_bytes: int) -> None:
        if peak_bytes >= self.min_backlog_bytes:
            self._due.set()

    def stop(self) -> None:
        self._stop.set()
        self._due.set()

    async def run(self, *, task_status: TaskStatus[Trimmer] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        if _libc_malloc_trim() is None:
            return  # nothing to call here: drained() only sets an event nobody waits for
        while True:
            await self._due.wait()
            if self._stop.is_set():
                return
            wait_s = self._last + self.min_interval_s - self.clock()
            if wait_s > 0:
                with anyio.move_on_after(wait_s):
                    await self._stop.wait()
                if self._stop.is_set():
                    return
            self._due = anyio.Event()
            self._last = self.clock()
            started = time.perf_counter()
            await anyio.to_thread.run_sync(malloc_trim)
            self.trims += 1
            log.debug("malloc_trim after a drained backlog: %.1f ms", 1000 * (time.perf_counter() - started))
