"""The Starlette app. Its lifespan owns one task group: the writer, the checkpointer, the janitor, the
ack-timeout task, the reconciler and the notifier run in it; it closes the actor registry, then the writer."""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
from starlette.applications import Starlette

from daemon.actors import ActorRegistry
from daemon.api import Api
from daemon.cache import PrefixTTLCache
from daemon.changes_signal import ChangesSignal
from daemon.config import Config
from daemon.erasing import Eraser
from daemon.errors import EXCEPTION_HANDLERS
from daemon.feed import Feed
from daemon.health import Health
from daemon.indexing import Indexer
from daemon.intake import Intake, IntakeSettings
from daemon.janitor import Janitor
from daemon.leadership import Leadership
from daemon.logs import RedactSecrets, config_secrets
from daemon.memory import Trimmer
from daemon.metrics import Metrics
from daemon.notifier import Notifier
from daemon.openapi import OpenAPI
from daemon.reconciler import Reconciler
from daemon.routes import ROUTES
from daemon.search_api import Search
from daemon.timeline import Timeline
from daemon.ui import ROUTES as VIEWER_ROUTES
from daemon.ui.pages import Viewer
from storage.checkpointer import Checkpointer
from storage.surface import surface_for
from storage.writer import Writer, WriterSettings

log = logging.getLogger("transcriptd")


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the running app holds; tests reach the writer and registry through ``app.state.runtime``."""

    config: Config
    writer: Writer
    registry: ActorRegistry
    cache: PrefixTTLCache
    janitor: Janitor


@dataclass(frozen=True, slots=True)
class ShutdownBudget:
    """How ``server.shutdown_timeout_s`` is shared, so the whole stop fits inside it."""

    requests_s: float  # uvicorn: finish the requests in flight
    mailboxes_s: float  # actors: flush their mailboxes and see their units committed
    storage_s: float  # writer: retry acknowledged deliveries while the storage is failing


def shutdown_budget(config: Config) -> ShutdownBudget:
    total = config.server.shutdown_timeout_s
    return ShutdownBudget(requests_s=0.4 * total, mailboxes_s=0.35 * total, storage_s=0.2 * total)


def writer_settings(
    config: Config, connection_factory: type[sqlite3.Connection] = sqlite3.Connection
) -> WriterSettings:
    return WriterSettings(
        path=config.storage.target,
        synchronous=config.storage.synchronous,
        cache_size_mib=config.storage.cache_size_mib,
        busy_timeout_ms=config.storage.busy_timeout_ms,
        max_rows=config.ingest.batch_max_rows,
        max_delay_s=config.ingest.batch_max_delay_ms / 1000,
        max_pending_rows=config.ingest.batch_max_rows * 10,
        drain_deadline_s=shutdown_budget(config).storage_s,
        connection_factory=connection_factory,
        record_changes=config.changes.enabled,
        replica=replica_name(config),
    )


def replica_name(config: Config) -> str:
    """This replica's name on a shared database (its heartbeat row, its connections' application_name)."""
    return f"{socket.gethostname()}:{config.server.port}"


def create_app(config: Config, *, writer_connection: type[sqlite3.Connection] = sqlite3.Connection) -> Starlette:
    """The daemon as an ASGI app. ``writer_connection`` is the writer's sqlite3 Connection class: only the
    bench changes it, to put a simulated network round trip in front of every statement."""
    ingest = config.ingest

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        cache = PrefixTTLCache(config.cache.max_entries, config.cache.ttl_s)

        def evict(conversation_ids: Iterable[str]) -> None:
            for cid in conversation_ids:
                cache.evict_prefix(("conv", cid))

        metrics = Metrics(scrape_tokens=(config.api.token, config.api.metrics_token))
        surface = surface_for(config.storage.target)
        # SQLite's WAL is ours to checkpoint; a PostgreSQL server manages its own.
        checkpointer = None if surface.postgres else Checkpointer(config.storage.target)

        def committed(rows: int, seconds: float) -> None:
            metrics.commit(rows, seconds)
            if checkpointer is not None:
                checkpointer.notify()

        writer = Writer(
            writer_settings(config, writer_connection),
            on_commit=evict,
            on_commit_stats=committed,
            on_changes=changes_signal.publish,
        )
        reader = surface.reader(connections=config.storage.read_connections if surface.postgres else 2)
        async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
            # start() waits until each is up, so a database that cannot open fails start-up, not a request.
            await tg.start(writer.run)
            changes_signal.publish(writer.opened_at_position)
            if checkpointer is not None:
                await tg.start(checkpointer.run)
            trimmer = Trimmer()
            await tg.start(trimmer.run)
            registry = ActorRegistry(
                writer,
                mailbox_size=ingest.mailbox_size,
                max_rows=ingest.batch_max_rows,
                retry_after_s=ingest.retry_after_s,
                max_inflight_bytes=ingest.max_inflight_mib * 1024 * 1024,
                max_inflight_messages=ingest.max_inflight_messages,
                on_drained=trimmer.drained,
            )
            janitor = Janitor(writer, cache, config.storage.retention_days, surface.retention)
            await tg.start(janitor.run)
            indexer = Indexer(writer, surface.search_index, enabled=config.search.enabled)
            await tg.start(indexer.run)
            await reader.open()
            stack.push_async_callback(reader.close)
            intake = Intake(
                IntakeSettings(
                    durable=ingest.ack == "durable",
                    max_body_bytes=ingest.max_body_bytes,
                    ack_timeout_s=ingest.ack_timeout_s,
                    retry_after_s=ingest.retry_after_s,
                    api_token=config.api.token,
                    webhooks=config.webhooks,
                    log_deliveries=config.logging.deliveries,
                ),
                registry,
                metrics,
            )
            if intake.settings.durable:  # nobody waits for an enqueued delivery
                await tg.start(intake.expire_acks)
            leadership = Leadership(surface)
            await tg.start(leadership.run)
            reconciler = Reconciler(config, registry, metrics, leadership=leadership)
            await tg.start(reconciler.run)
            notifier = Notifier(config.notify, surface, writer, changes_signal, leadership=leadership)
            await tg.start(notifier.run)
            metrics.watch_notify(notifier)
            metrics.watch(
                live_actors=lambda: registry.live_actors,
                mailbox_depth=lambda: registry.queued,
                oldest_pending_at=lambda: registry.oldest_pending_at,
                inflight_bytes=lambda: registry.inflight_bytes,
                cache=cache,
                wal_bytes=None if checkpointer is None else checkpointer.wal_bytes,
                wal_pinned_s=None if checkpointer is None else checkpointer.pinned_s,
            )
            metrics.watch_erasure(dropped=lambda: writer.dropped_erased)
            app.state.metrics = metrics
            app.state.runtime = Runtime(config, writer, registry, cache, janitor)
            app.state.intake = intake
            app.state.health = Health(
                writer,
                registry,
                ingest.retry_after_s,
                checkpointer,
                reconciler,
                notifier,
                leadership if surface.postgres else None,
            )
            app.state.api = Api(reader, cache, config.api.token)
            app.state.timeline = Timeline(reader, config.api.token, RedactSecrets(config_secrets(config)))
            app.state.feed = Feed(
                reader,
                changes_signal,
                config.api.token,
                max_wait_s=config.changes.max_wait_s,
                heartbeat_s=config.changes.heartbeat_s,
            )
            app.state.search = Search(reader, config.api.token, enabled=config.search.enabled)
            app.state.viewer = Viewer(
                app.state.api,
                app.state.timeline,
                app.state.search,
                config.api.token,
                retry_after_s=ingest.retry_after_s,
            )
            app.state.openapi = OpenAPI()
            app.state.erasure = Eraser(writer, surface, cache, config.api.token, changes_signal)
            log.info(
                "transcriptd ready: storage %s (synchronous=%s), ack=%s",
                surface.where,
                config.storage.synchronous,
                ingest.ack,
            )
            try:
                yield
            finally:
                # The server has stopped taking requests and finished the ones in flight: drain
                # every mailbox, then commit what is left, then close the database.
                budget = shutdown_budget(config)
                with anyio.CancelScope(shield=True):
                    reconciler.stop()  # first: it submits to the actors, which stop taking deliveries next
                    leadership.stop()
                    janitor.stop()
                    indexer.stop()
                    notifier.stop()  # attempts in flight are abandoned: sent again after the restart
                    intake.stop()
                    drained = await registry.close(timeout_s=budget.mailboxes_s)
                    await notifier.stopped()  # it records the finished attempts through the writer
                    await writer.close()
                    if checkpointer is not None:
                        checkpointer.stop()
                    trimmer.stop()
                if drained:
                    log.info("transcriptd stopped: every mailbox drained, %d commits", writer.commits)
                else:
                    log.error("transcriptd stopped after %.0f s with deliveries not drained", budget.mailboxes_s)

    # Made before the lifespan starts: the server closes it as soon as it is told to stop (see
    # daemon.server.DrainingServer), before it waits for the requests in flight, which open feeds are.
    changes_signal = ChangesSignal()
    app = Starlette(
        routes=[*ROUTES, *VIEWER_ROUTES],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.changes_signal = changes_signal
    # Every route also answers with a trailing slash (see daemon.routes), so nothing is ever redirected: a
    # redirect would put the webhook token into a Location header.
    app.router.redirect_slashes = False
    return app
