"""Which replica does the work only one may do at a time: sending the outbound notifications (strictly in
order per conversation per receiver) and polling the vendors' APIs for missed calls (one poller per API key).

On SQLite there is one process: it leads. On PostgreSQL the replica holding a session-level advisory lock
leads (storage.postgres.leader); when it stops, dies or loses its connection the server releases the lock
and another replica takes it within ``retry_s``. The leader checks its session every ``check_s``, and a
replica that finds its session gone stops leading at once, so two replicas overlap at most for that long:
the receivers' at-least-once contract (the ``webhook-id`` header) covers it.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus

from storage.surface import Surface


class Leadership:
    def __init__(self, surface: Surface, *, retry_s: float = 5.0, check_s: float = 2.0) -> None:
        self.surface = surface
        self.retry_s = retry_s
        self.check_s = check_s
        self._leading = not surface.postgres
        self._stop = anyio.Event()

    @property
    def leading(self) -> bool:
        return self._leading

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        lead = self.surface.leader()
        try:
            while not self._stop.is_set():
                self._leading = await anyio.to_thread.run_sync(lead.leads)
                with anyio.move_on_after(self.check_s if self._leading else self.retry_s):
                    await self._stop.wait()
        finally:
            self._leading = False
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lead.close)

    def stop(self) -> None:
        self._stop.set()
