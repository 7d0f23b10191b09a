"""POST handlers: authenticate, bound the body, decode, hand to the conversation's actor, answer.

With ``ingest.ack = "durable"`` the answer waits for the commit that holds the delivery; with
``"enqueued"`` it comes as soon as the delivery is in its actor's mailbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskStatus
from starlette.requests import Request
from starlette.responses import Response

from daemon import generic, metadata, tavus
from daemon.actors import ActorRegistry
from daemon.auth import check_bearer, check_path_token
from daemon.errors import InvalidPayload, PayloadTooLarge, Problem, StorageAckTimeout
from daemon.metrics import Metrics
from daemon.signatures import SignatureVerifier
from storage.deliveries import Delivery, WriteResult, weight_of


class Stored(msgspec.Struct, kw_only=True, tag_field="status", tag="stored"):
    """200: the delivery is committed. ``duplicates`` were already stored, unchanged."""

    received: int
    inserted: int
    updated: int
    duplicates: int
    rejected: int


class Dropped(msgspec.Struct, kw_only=True, tag_field="status", tag="erased"):
    """200: the conversation was erased, so nothing of the delivery was stored (and nothing will be, until
    ``transcriptd delete --undo``). A 2xx, so that the sender does not retry."""

    received: int


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
    tavus_token: str
    api_token: str
    tavus_signing_secret: str = ""  # "" = deliveries are not signed
    tavus_signature_tolerance_s: float = 300.0


class Intake:
    def __init__(self, settings: IntakeSettings, registry: ActorRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.tavus_signatures = (
            SignatureVerifier(settings.tavus_signing_secret, tolerance_s=settings.tavus_signature_tolerance_s)
            if settings.tavus_signing_secret.strip()
            else None
        )
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

    async def tavus_webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        check_path_token(request.path_params.get("token"), self.settings.tavus_token)
        body = await self._read_body(request)
        if self.tavus_signatures is not None:
            # Over the bytes as received, before anything decodes or stores them.
            self.tavus_signatures.verify(body, request.headers)
        delivery, problems = tavus.parse(body, request.headers, received_at=time.time())
        return await self._accept(_with_metadata(delivery, problems, request), problems, started)

    async def post_messages(self, request: Request) -> Response:
        started = time.perf_counter()
        check_bearer(request, self.settings.api_token)
        body = await self._read_body(request)
        delivery, problems = generic.parse(
            request.path_params["conversation_id"], body, request.headers, received_at=time.time()
        )
        return await self._accept(_with_metadata(delivery, problems, request), problems, started)

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
        if delivery.result.erased:
            metrics.delivery(delivery.event_type, "erased", None)
            metrics.ack_durable.observe(time.perf_counter() - started)
            return _json(Dropped(received=delivery.received), 200)
        stored = _stored(delivery.result)
        outcome = "partial" if problems else "duplicate" if delivery.result.duplicate_delivery else "stored"
        metrics.delivery(delivery.event_type, outcome, delivery.result)
        metrics.ack_durable.observe(time.perf_counter() - started)
        if problems:
            raise InvalidPayload(problems, accepted=msgspec.to_builtins(stored))
        return _json(stored, 200)


def _with_metadata(delivery: Delivery, problems: list[Problem], request: Request) -> Delivery:
    """The URL's query parameters as the conversation's metadata; a refused one joins ``problems``."""
    if request.scope.get("query_string"):  # most callback URLs carry none: nothing to do on the common path
        delivery.metadata, refused = metadata.from_query(request.query_params.multi_items())
        problems.extend(refused)
    return delivery


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
