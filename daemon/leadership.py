"""Which replica does the work only one may do at a time: sending the outbound notifications (strictly in
order per conversation per receiver) and polling the vendors' APIs for missed calls (one poller per API key).

On SQLite there is one process: it leads. On PostgreSQL the replica holding a session-level advisory lock
leads, on a connection of its own; when that replica dies or its connection is lost, the server releases
the lock and another replica takes it within ``retry_s``. A replica that loses its connection stops leading
at once, so two replicas overlap at most for the moment the server takes to notice the old session gone:
the receivers' at-least-once contract (the ``webhook-id`` header) covers that.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus

from storage.surface import Surface

log = logging.getLogger("transcriptd.leadership")

# pg_try_advisory_lock's key: "trnsclead", distinct from the migrations' lock.
LEADER_LOCK = 0x74726E736C656164


class Leadership:
    def __init__(self, surface: Surface, *, retry_s: float = 5.0, check_s: float = 2.0) -> None:
        self.surface = surface
        self.retry_s = retry_s
        self.check_s = check_s
        self._leading = not surface.postgres
        self._stop = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.surface.postgres:
            await self._stop.wait()
            return
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = await anyio.to_thread.run_sync(self.surface.read_connection)
                while not await anyio.to_thread.run_sync(_try_lock, conn):
                    await self._sleep(self.retry_s)
                    if self._stop.is_set():
                        return
                log.info("this replica leads now: it sends the notifications and reconciles with the vendors")
                self._leading = True
                while not self._stop.is_set():
                    await self._sleep(self.check_s)
                    await anyio.to_thread.run_sync(_alive, conn)  # raises once the session is gone
            except Exception as exc:  # the server went away: not leading until a new session holds the lock
                if self._leading:
                    log.warning("this replica stops leading: %s: %s", exc.__class__.__name__, exc)
                self._leading = False
                await self._sleep(self.retry_s)
            finally:
                self._leading = False
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(conn.close)

    @property
    def leading(self) -> bool:
        return self._leading

    def stop(self) -> None:
        self._stop.set()

    async def _sleep(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop.wait()


def _try_lock(conn: Any) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
    return bool(row and row[0])


def _alive(conn: Any) -> None:
    conn.execute("SELECT 1").fetchone()
