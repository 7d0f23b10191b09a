"""POST handlers: authenticate, bound the body, decode, hand to the conversation's actor, answer.

With ``ingest.ack = "durable"`` the answer waits for the commit that holds the delivery; with
``"enqueued"`` it comes as soon as the delivery is in its actor's mailbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus
from starlette.requests import Request
from starlette.responses import Response

from daemon import delivery_log, metadata
from daemon.actors import ActorRegistry
from daemon.auth import check_bearer, check_path_token
from daemon.errors import (
    BODY_TIMED_OUT,
    BodyTimeout,
    ClientDisconnected,
    InvalidPayload,
    PayloadTooLarge,
    Problem,
    StorageAckTimeout,
)
from daemon.ids import PARAM, path_id
from daemon.inflight import InFlight
from daemon.metrics import Metrics
from daemon.sources import SOURCES, Source
from daemon.sources.model import Parse, Verify
from storage.deliveries import Record, WriteResult, weight_of


class Stored(msgspec.Struct, kw_only=True, tag_field="status", tag="stored"):
    """200: the delivery is committed. ``duplicates`` were already stored, unchanged."""

    received: int
    inserted: int
    updated: int
    duplicates: int
    rejected: int
    # A delivery without messages (system.shutdown) counts all zeros either way: this tells a repeat apart.
    duplicate: Annotated[
        bool, msgspec.Meta(description="this delivery (its idempotency key) was stored before: nothing changed")
    ] = False


class Dropped(msgspec.Struct, kw_only=True, tag_field="status", tag="erased"):
    """200: the conversation was erased, so nothing of the delivery was stored (and nothing will be, until
    ``transcriptd delete --undo``). A 2xx, so that the sender does not retry."""

    received: int


class Enqueued(msgspec.Struct, kw_only=True):
    """202: the delivery is in memory, to be committed shortly (``ingest.ack = "enqueued"``)."""

    status: Literal["enqueued"] = "enqueued"
    received: int
    rejected: int


VERIFY_IN_THREAD_BYTES = 1024 * 1024  # below this a signature takes under ~2 ms: a thread would cost more


@dataclass(frozen=True, slots=True)
class IntakeSettings:
    durable: bool
    max_body_bytes: int
    ack_timeout_s: float
    retry_after_s: int
    api_token: str
    webhooks: Any  # the webhooks.* settings: one section per source that has one (daemon.config)
    log_deliveries: bool = True  # logging.deliveries: one line per delivery (daemon.delivery_log)


@dataclass(frozen=True, slots=True)
class _Gate:
    """A source's checks, built once at start-up from its settings."""

    token: str  # webhooks.<name>.token ("" = the bare path)
    verify: Verify | None
    parse: Parse
    max_body_bytes: int


class Intake:
    def __init__(self, settings: IntakeSettings, registry: ActorRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._gates = {source.name: _gate(source, settings) for source in SOURCES}
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
        body, delivery, cid = b"", None, None
        try:
            gate = self._gates[source.name]
            params = request.path_params
            if source.bearer:
                check_bearer(request, self.settings.api_token)
            else:
                check_path_token(params.get("token"), gate.token, source.name)
            path: dict[str, str] = {}
            if PARAM in params:
                # Routed on the raw path: decoded strictly here (invalid UTF-8 is a 400, not U+FFFD).
                cid = path[PARAM] = path_id(request)
            body = await self._read_body(request, gate.max_body_bytes)
            if gate.verify is not None:
                # Over the bytes as received, before anything decodes or stores them. An HMAC over megabytes
                # (ElevenLabs' audio: ~50-90 ms for 40 MiB here) releases the GIL: in a worker thread, it does
                # not hold up every other request meanwhile.
                if len(body) >= VERIFY_IN_THREAD_BYTES:
                    await anyio.to_thread.run_sync(gate.verify, body, request.headers)
                else:
                    gate.verify(body, request.headers)
            record, problems = gate.parse(body, request.headers, received_at=time.time(), **path)
            delivery = InFlight(_completed(record, problems, request), awaited=self.settings.durable)
            return await self._accept(delivery, problems, started, source.enqueued_status)
        except Exception as exc:
            if self.settings.log_deliveries:
                # An id that is not UTF-8 is named as it came, percent-encoded.
                conversation = cid if cid is not None else request.path_params.get(PARAM)
                delivery_log.not_stored(
                    exc, source=source.name, conversation=conversation, body=body, delivery=delivery, started=started
                )
            raise

    async def _read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit():
            length = int(declared)
            if length > limit:
                raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
            # Refused before the body is read: reading it would take the memory the budget protects.
            # Its rows are not known yet: the full weight is checked when the delivery is submitted.
            self.registry.check_room(weight_of(length))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await request.receive()
            if message["type"] != "http.request":
                timed_out = request.scope.get(BODY_TIMED_OUT)
                if timed_out is not None:
                    raise BodyTimeout(f"the body did not all arrive within {timed_out:g} s ({size} bytes came)")
                raise ClientDisconnected("the sender went away before its body was all in")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _accept(
        self, delivery: InFlight, problems: list[Problem], started: float, enqueued_status: int = 202
    ) -> Response:
        durable, record = delivery.awaited, delivery.record
        self.registry.submit(delivery)
        if delivery.error is not None:  # refused on the spot (the writer is closing): not even enqueued
            raise delivery.error
        metrics = self.metrics
        if not durable:
            enqueued = Enqueued(received=record.received, rejected=record.rejected)
            metrics.delivery(record.event_type, "partial" if problems else "enqueued", None, record.rejected)
            metrics.ack_enqueued.observe(time.perf_counter() - started)
            if problems:
                raise InvalidPayload(problems, accepted=msgspec.to_builtins(enqueued))
            if self.settings.log_deliveries:
                delivery_log.enqueued(delivery, started)
            return _json(enqueued, enqueued_status)
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
            metrics.delivery(record.event_type, "erased", None)
            metrics.ack_durable.observe(time.perf_counter() - started)
            return _json(Dropped(received=record.received), 200)
        stored = _stored(delivery.result)
        outcome = "partial" if problems else "duplicate" if delivery.result.duplicate_delivery else "stored"
        metrics.delivery(record.event_type, outcome, delivery.result)
        metrics.ack_durable.observe(time.perf_counter() - started)
        if problems:
            raise InvalidPayload(problems, accepted=msgspec.to_builtins(stored))
        if self.settings.log_deliveries:
            delivery_log.stored(delivery, delivery.result, outcome, started)
        return _json(stored, 200)


def _gate(source: Source[Any], intake: IntakeSettings) -> _Gate:
    webhooks = intake.webhooks
    settings = source.settings_in(webhooks)
    return _Gate(
        token=settings.token if settings is not None else "",
        verify=source.verifier(webhooks),
        parse=source.parser(webhooks),
        max_body_bytes=source.body_limit(webhooks, intake.max_body_bytes),
    )


def _completed(record: Record, problems: list[Problem], request: Request) -> Record:
    """The parsed record with what intake adds: the URL's query parameters as the conversation's metadata
    (a refused one joins ``problems``), and how many problems the answer names. A copy only when there is
    something to add: most callback URLs carry no query, and most bodies have no problem."""
    found = None
    if request.scope.get("query_string"):
        found, refused = metadata.from_query(request.query_params.multi_items())
        problems.extend(refused)
    if found is None and not problems:
        return record
    return msgspec.structs.replace(record, metadata=found, problems=len(problems))


def _stored(result: WriteResult) -> Stored:
    return Stored(
        received=result.received,
        inserted=result.inserted,
        updated=result.updated,
        duplicates=result.duplicates,
        rejected=result.rejected,
        duplicate=result.duplicate_delivery,
    )


def _json(payload: msgspec.Struct, status: int) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json")
