"""Liveness and readiness: is the process up, and can it take deliveries and commit them now."""

from __future__ import annotations

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from daemon.actors import ActorRegistry
from daemon.leadership import Leadership
from daemon.notifier import Notifier, ReceiverState
from daemon.reconciler import Reconciler, SourceState
from storage.checkpointer import Checkpointer
from storage.writer import Writer

PROBE_TIMEOUT_S = 2.0


class Readiness(msgspec.Struct, omit_defaults=True):
    status: str
    writer: str
    intake: str
    live_actors: int
    queued_deliveries: int
    storage_error: str | None = None
    # Replicas on one PostgreSQL: whether this one leads (sends notifications, reconciles); absent on SQLite.
    leader: bool | None = None
    # Conditions an operator should look at that do not stop intake (a reader pinning the WAL).
    warnings: list[str] = []
    # By source: the reconciler's passes and its last error. Detail only: a vendor's outage is not ours.
    reconcile: dict[str, SourceState] | None = None
    # By receiver (notify.url, without its query): what it is owed, and its failures. Detail only: an app
    # that is down is not a reason to refuse deliveries; the outbox keeps its changes.
    notify: dict[str, ReceiverState] | None = None


class Health:
    def __init__(
        self,
        writer: Writer,
        registry: ActorRegistry,
        retry_after_s: int,
        checkpointer: Checkpointer | None = None,
        reconciler: Reconciler | None = None,
        notifier: Notifier | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.leadership = leadership
        self.writer = writer
        self.registry = registry
        self.retry_after_s = retry_after_s
        self.checkpointer = checkpointer
        self.reconciler = reconciler
        self.notifier = notifier

    async def livez(self, request: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        """Ready when intake and the writer run and the database takes a commit now."""
        error: str | None = f"the writer did not answer within {PROBE_TIMEOUT_S:g} s"
        with anyio.move_on_after(PROBE_TIMEOUT_S):
            error = await self.writer.probe()
        ready = error is None and self.writer.state == "running" and self.registry.state == "running"
        body = Readiness(
            status="ready" if ready else "not_ready",
            writer=self.writer.state,
            intake=self.registry.state,
            live_actors=self.registry.live_actors,
            queued_deliveries=self.registry.queued,
            storage_error=error,
            leader=self.leadership.leading if self.leadership is not None else None,
            warnings=self._warnings(),
            reconcile=(self.reconciler.states or None) if self.reconciler is not None else None,
            notify=(self.notifier.states() or None) if self.notifier is not None else None,
        )
        headers = None if ready else {"Retry-After": str(self.retry_after_s)}
        return Response(
            msgspec.json.encode(body),
            status_code=200 if ready else 503,
            media_type="application/json",
            headers=headers,
        )

    def _warnings(self) -> list[str]:
        warning = None if self.checkpointer is None else self.checkpointer.warning()
        notify = [] if self.notifier is None else self.notifier.warnings()
        return ([] if warning is None else [warning]) + notify
