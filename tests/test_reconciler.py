"""The daemon's own reconciler: a real ``transcriptd serve`` and the in-process app, against a stand-in of
Tavus's API."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from daemon.app import create_app
from daemon.reconciler import Reconciler
from tests.conftest import make_config
from tests.daemon_process import EXIT_TIMEOUT_S, managed, start_daemon
from tests.payloads import encode
from tests.reconcile_tools import count, post_webhooks, snapshot
from tests.test_reconcile_tavus import callbacks, iso
from tests.vendor_standin import TAVUS_KEY, StandIn, tavus_api, tavus_conversation

WAIT_S = 20.0  # how long a test waits for the reconciler, at most


@pytest.fixture
def quiet_call() -> Iterator[tuple[StandIn, dict[str, list[dict[str, Any]]]]]:
    """Tavus holds two ended calls: ``joined``, whose join reached us and nothing more, and ``unseen``."""
    calls = {"joined": callbacks("joined", 3), "unseen": callbacks("unseen", 4)}
    with tavus_api() as standin:
        for cid, bodies in calls.items():
            standin.conversations[cid] = tavus_conversation(cid, iso(time.time() - 120), bodies)
        yield standin, calls


def api_env(standin: StandIn, **extra: str) -> dict[str, str]:
    return {
        "TRANSCRIPTD_WEBHOOKS_TAVUS_API_KEY": TAVUS_KEY,
        "TRANSCRIPTD_WEBHOOKS_TAVUS_API_URL": standin.base_url,
        **extra,
    }


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        time.sleep(0.1)


def test_a_conversation_that_joined_and_went_quiet_gets_its_transcript_from_the_running_daemon(
    tmp_path: Path, target: str, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = quiet_call
    fed = tmp_path / "fed.db"
    bodies = [encode(b) for call in calls.values() for b in call]
    anyio.run(post_webhooks, fed, "/webhooks/tavus", bodies, backend="asyncio")
    db = target  # the daemon's; the webhooks fed to a SQLite file are the reference
    standin.fail("/v2/conversations", 429, retry_after="0")  # the first pass is rate-limited once
    env = api_env(standin, TRANSCRIPTD_RECONCILE_INTERVAL_S="1", TRANSCRIPTD_RECONCILE_GRACE_S="0")
    with managed(start_daemon(tmp_path / "run", db, env=env)) as daemon:
        with httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=10) as client:
            joined = client.post("/webhooks/tavus", content=encode(calls["joined"][0]))
            assert joined.status_code == 200
            wait_for(
                lambda: (
                    count(db, "SELECT count(*) FROM messages WHERE conversation_id IN ('joined', 'unseen')")
                    == count(fed, "SELECT count(*) FROM messages")
                ),
                "both transcripts stored",
            )
            ready = client.get("/readyz").json()
            metrics = client.get("/metrics").text
        assert ready["status"] == "ready"
        tavus = ready["reconcile"]["tavus"]
        assert tavus["passes"] >= 1
        assert tavus["fetched"] >= 2
        assert tavus["recovered_messages"] == count(fed, "SELECT count(*) FROM messages")
        assert 'transcriptd_reconcile_passes_total{source="tavus"}' in metrics
        assert 'transcriptd_reconcile_conversations_fetched_total{source="tavus"}' in metrics
        assert "transcriptd_reconcile_messages_recovered_total" in metrics
        assert daemon.stop() == 0
        log = daemon.log()
    assert snapshot(db, calls) == snapshot(fed, calls)
    assert "HTTP 429; retrying" in log
    assert TAVUS_KEY not in log
    # Both settled: later passes listed them again but fetched neither twice.
    assert len(standin.requests_to("/v2/conversations/joined")) == 1


@pytest.mark.anyio
async def test_a_vendor_outage_is_logged_counted_and_shown_in_readyz_and_the_next_pass_recovers(
    target: str, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = quiet_call
    config = make_config(
        target,
        **{
            "webhooks.tavus.api_key": TAVUS_KEY,
            "webhooks.tavus.api_url": standin.base_url,
            "reconcile.interval_s": 3600,  # passes run when the test says
            "reconcile.grace_s": 0,
            "reconcile.max_attempts": 2,
        },
    )
    app: Starlette = create_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
    ):
        reconciler: Reconciler = app.state.health.reconciler
        await client.post("/webhooks/tavus", content=encode(calls["joined"][0]))
        standin.fail("/v2/conversations", 503, times=2)
        await reconciler.run_pass()
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # the vendor's outage is not ours
        state = ready.json()["reconcile"]["tavus"]
        assert state["errors"] == 1
        assert state["last_error"] == "tavus API GET /v2/conversations: HTTP 503 after 2 attempts"
        assert 'transcriptd_reconcile_errors_total{source="tavus"} 1.0' in (await client.get("/metrics")).text
        assert count(target, "SELECT count(*) FROM messages") == 0

        await reconciler.run_pass()
        state = (await client.get("/readyz")).json()["reconcile"]["tavus"]
        assert "last_error" not in state
        assert state["passes"] == 2
        stored = count(target, "SELECT count(*) FROM messages WHERE conversation_id = 'joined'")
        assert stored == len(calls["joined"][3]["properties"]["transcript"])


@pytest.mark.anyio
async def test_without_an_api_key_or_with_interval_0_nothing_is_reconciled(
    db_path: Path, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = quiet_call
    for settings in (
        {"webhooks.tavus.api_url": standin.base_url},
        {"webhooks.tavus.api_key": TAVUS_KEY, "webhooks.tavus.api_url": standin.base_url, "reconcile.interval_s": 0},
    ):
        app: Starlette = create_app(make_config(db_path, **settings))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
        ):
            await app.state.health.reconciler.run_pass()
            assert "reconcile" not in (await client.get("/readyz")).json()
    assert standin.seen == []


def test_sigterm_during_a_slow_pass_stops_the_daemon_cleanly(
    tmp_path: Path, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = quiet_call
    # The first pass hangs on the vendor for longer than the daemon may take to stop (daemon.stop fails
    # the test past EXIT_TIMEOUT_S), and the request's own timeout is longer still.
    standin.slow("/v2/conversations", 3 * EXIT_TIMEOUT_S)
    env = api_env(
        standin,
        TRANSCRIPTD_RECONCILE_INTERVAL_S="0.2",
        TRANSCRIPTD_RECONCILE_GRACE_S="0",
        TRANSCRIPTD_RECONCILE_REQUEST_TIMEOUT_S=str(4 * EXIT_TIMEOUT_S),
    )
    with managed(start_daemon(tmp_path / "run", tmp_path / "t.db", env=env)) as daemon:
        wait_for(lambda: not standin.faults, "the first pass asked the vendor")
        assert daemon.stop(signal.SIGTERM) == 0
        log = daemon.log()
    assert "transcriptd stopped: every mailbox drained" in log


@pytest.mark.anyio
async def test_a_conversation_still_going_at_the_vendor_is_not_fetched_until_it_ends(
    target: str, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = quiet_call
    live = calls["joined"][:1]  # only the join so far, here and at the vendor
    standin.conversations["joined"] = tavus_conversation("joined", iso(time.time() - 60), live)
    assert standin.conversations["joined"]["status"] == "active"
    settings = {
        "webhooks.tavus.api_key": TAVUS_KEY,
        "webhooks.tavus.api_url": standin.base_url,
        "reconcile.interval_s": 3600,
        "reconcile.grace_s": 0,
    }
    app: Starlette = create_app(make_config(target, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
    ):
        await client.post("/webhooks/tavus", content=encode(live[0]))
        reconciler: Reconciler = app.state.health.reconciler
        await reconciler.run_pass()
        assert not standin.requests_to("/v2/conversations/joined")
        standin.conversations["joined"] = tavus_conversation("joined", iso(time.time() - 60), calls["joined"])
        await reconciler.run_pass()
        assert len(standin.requests_to("/v2/conversations/joined")) == 1
    stored = count(target, "SELECT count(*) FROM messages WHERE conversation_id = 'joined'")
    assert stored == len(calls["joined"][3]["properties"]["transcript"])


@pytest.mark.anyio
async def test_a_conversation_the_vendor_does_not_know_costs_only_itself(
    target: str, quiet_call: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = quiet_call
    settings = {
        "webhooks.tavus.api_key": TAVUS_KEY,
        "webhooks.tavus.api_url": standin.base_url,
        "reconcile.interval_s": 3600,
        "reconcile.grace_s": 0,
    }
    stray = encode(callbacks("stray", 1)[0])  # a join of a conversation Tavus answers 404 for
    app: Starlette = create_app(make_config(target, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
    ):
        await client.post("/webhooks/tavus", content=stray)
        await client.post("/webhooks/tavus", content=encode(calls["joined"][0]))
        reconciler: Reconciler = app.state.health.reconciler
        await reconciler.run_pass()
        state = (await client.get("/readyz")).json()["reconcile"]["tavus"]
        assert state["last_error"] == "tavus API GET /v2/conversations/stray: HTTP 404"
        assert count(target, "SELECT count(*) FROM messages WHERE conversation_id = 'joined'") > 0
        await reconciler.run_pass()  # not asked for again
        assert len(standin.requests_to("/v2/conversations/stray")) == 1
        assert "last_error" not in (await client.get("/readyz")).json()["reconcile"]["tavus"]
