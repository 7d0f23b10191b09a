"""POST handlers: authenticate, bound the body, decode, hand to the conversation's actor, answer.

With ``ingest.ack = "durable"`` the answer waits for the commit that holds the delivery; with
``"enqueued"`` it comes as soon as the delivery is in its actor's mailbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus
from starlette.requests import Request
from starlette.responses import Response

from daemon.actors import ActorRegistry
from daemon.auth import check_bearer, check_path_token
from daemon.errors import InvalidPayload, PayloadTooLarge, Problem, StorageAckTimeout
from daemon.metrics import Metrics
from daemon.sources import SOURCES, Source
from daemon.sources.model import Verify
from storage.deliveries import Delivery, WriteResult, weight_of


class Stored(msgspec.Struct, kw_only=True):
    """200: the delivery is committed. ``duplicates`` were already stored, unchanged."""

    status: Literal["stored"] = "stored"
    received: int
    inserted: int
    updated: int
    duplicates: int
    rejected: int


class Enqueued(msgspec.Struct, kw_only=True):
    """202: the delivery is in memory, to be committed shortly (``ingest.ack = "enqueued"``)."""

    status: Literal["enqueued"] = "enqueued"
    received: int
    rejected: int


@dataclass(frozen=True, slots=True)
class IntakeSettings:
    durable: bool
    max_body_bytes: int
    ack_timeout_s: float
    retry_after_s: int
    api_token: str
    webhooks: Any  # the webhooks.* settings: one section per source that has one (daemon.config)


@dataclass(frozen=True, slots=True)
class _Gate:
    """A source's checks, built once at start-up from its settings."""

    token: str  # webhooks.<name>.token ("" = the bare path)
    verify: Verify | None


class Intake:
    def __init__(self, settings: IntakeSettings, registry: ActorRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._gates = {source.name: _gate(source, settings.webhooks) for source in SOURCES}
        self._stopping = anyio.Event()

    async def expire_acks(self, *, task_status: TaskStatus[Intake] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer 503 to durable senders whose commit has not come within ``ack_timeout_s`` (give or take
        a quarter of it, at most 0.1 s). One task looks for them, rather than a timer per request: a
        cancel scope per request cost 4-6% of the durable throughput at 64 senders, side by side."""
        period = max(0.001, min(0.1, self.settings.ack_timeout_s / 4))
        task_status.started(self)
        while not self._stopping.is_set():
            with anyio.move_on_after(period):
                await self._stopping.wait()
            self.registry.give_up_waiting(time.monotonic() - self.settings.ack_timeout_s)

    def stop(self) -> None:
        self._stopping.set()

    async def receive(self, request: Request, source: Source[Any]) -> Response:
        """One delivery of ``source``: tokens, the body within its limit, its signature, parse, accept."""
        started = time.perf_counter()
        gate = self._gates[source.name]
        params = request.path_params
        if source.bearer:
            check_bearer(request, self.settings.api_token)
        else:
            check_path_token(params.get("token"), gate.token, source.name)
        body = await self._read_body(request)
        if gate.verify is not None:
            # Over the bytes as received, before anything decodes or stores them.
            gate.verify(body, request.headers)
        path = {name: value for name, value in params.items() if name != "token"} if params else {}
        delivery, problems = source.parse(body, request.headers, received_at=time.time(), **path)
        return await self._accept(delivery, problems, started)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit():
            length = int(declared)
            if length > limit:
                raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
            # Refused before the body is read: reading it would take the memory the budget protects.
            self.registry.check_room(weight_of(length))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _accept(self, delivery: Delivery, problems: list[Problem], started: float) -> Response:
        durable = self.settings.durable
        delivery.awaited = durable
        self.registry.submit(delivery)
        if delivery.error is not None:  # refused on the spot (the writer is closing): not even enqueued
            raise delivery.error
        metrics = self.metrics
        if not durable:
            enqueued = Enqueued(received=delivery.received, rejected=delivery.rejected)
            metrics.delivery(delivery.event_type, "partial" if problems else "enqueued", None, delivery.rejected)
            metrics.ack_enqueued.observe(time.perf_counter() - started)
            if problems:
                raise InvalidPayload(problems, accepted=msgspec.to_builtins(enqueued))
            return _json(enqueued, 202)
        await delivery.done.wait()  # set by the commit, or by expire_acks when it takes too long
        if delivery.error is not None:
            raise delivery.error
        if delivery.result is None:
            # Still queued or committing: it may yet be stored, and a retry is deduplicated.
            raise StorageAckTimeout(
                f"the delivery was not committed within {self.settings.ack_timeout_s:g} s; retry",
                retry_after=self.settings.retry_after_s,
            )
        stored = _stored(delivery.result)
        outcome = "partial" if problems else "duplicate" if delivery.result.duplicate_delivery else "stored"
        metrics.delivery(delivery.event_type, outcome, delivery.result)
        metrics.ack_durable.observe(time.perf_counter() - started)
        if problems:
            raise InvalidPayload(problems, accepted=msgspec.to_builtins(stored))
        return _json(stored, 200)


def _gate(source: Source[Any], webhooks: Any) -> _Gate:
    settings = source.settings_in(webhooks)
    return _Gate(token=settings.token if settings is not None else "", verify=source.verifier(webhooks))


def _stored(result: WriteResult) -> Stored:
    return Stored(
        received=result.received,
        inserted=result.inserted,
        updated=result.updated,
        duplicates=result.duplicates,
        rejected=result.rejected,
    )


def _json(payload: msgspec.Struct, status: int) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json")
