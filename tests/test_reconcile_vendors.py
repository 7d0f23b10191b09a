"""Reconcile for every vendor beyond Tavus (tests/test_reconcile_tavus.py), against its stand-in API.

The same scenario for each: the daemon was down while the calls' webhooks were sent; ``transcriptd
reconcile`` stores what they would have stored (compared with a database fed by them), honours a 429,
pages through the list, retries a 5xx; a second run and the late webhooks add nothing; the key shows
nowhere. Then the daemon's own reconciler fetches a call that started here and went quiet.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from daemon.app import create_app
from tests.conftest import make_config
from tests.daemon_process import transcriptd
from tests.reconcile_tools import count, post_webhooks, snapshot
from tests.reconcile_vendors import CASES, Call, VendorCase
from tests.vendor_standin import StandIn

pytestmark = pytest.mark.anyio

RECENT = 30  # more than the stand-ins' 25 a page
OLD = 1  # created before the window


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def vendor(request: pytest.FixtureRequest) -> Iterator[tuple[VendorCase, StandIn, list[Call]]]:
    case: VendorCase = request.param
    now = time.time()
    calls = [case.call(i, now - 60 * (i + 2) if i < RECENT else now - 5 * 3600) for i in range(RECENT + OLD)]
    with case.api() as standin:
        for call in calls:
            standin.conversations[call.conversation_id] = call.record
        yield case, standin, calls


def reconcile(
    case: VendorCase, standin: StandIn, tmp_path: Path, db: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = case.url_env(standin)
    return transcriptd("reconcile", "--source", case.name, "--db", str(db), *args, cwd=tmp_path, timeout=120, env=env)


async def test_reconcile_stores_what_the_webhooks_would_have_and_nothing_twice(
    tmp_path: Path, vendor: tuple[VendorCase, StandIn, list[Call]]
) -> None:
    case, standin, calls = vendor
    recent = calls[:RECENT]
    ids = [call.conversation_id for call in recent]

    async def post(db: Path, bodies: list[bytes]) -> list[dict[str, int]]:
        return await post_webhooks(db, f"/webhooks/{case.name}", bodies, settings=case.webhook_settings, sign=case.sign)

    fed = tmp_path / "webhooks.db"
    await post(fed, [body for call in recent for body in call.webhooks])
    down = tmp_path / "down.db"
    await post(down, recent[0].started)  # the first call started before the daemon went down

    standin.fail(case.list_path, 429, retry_after="1")
    standin.fail(case.get_path(ids[3]), 503)
    standin.slow(case.get_path(ids[5]), 0.5)
    done = reconcile(case, standin, tmp_path, down, "--since", "3h")
    assert done.returncode == 0, done.stderr
    assert f"found {RECENT}, {RECENT} missing or incomplete here" in done.stdout
    assert f"fetched {RECENT}, stored {RECENT} (" in done.stdout
    listed = [s for s in standin.requests_to(case.list_path) if s.path == case.list_path]
    assert listed[0].status == 429
    assert len([s for s in listed if s.status == 200]) >= 2  # paged
    assert [s.status for s in standin.requests_to(case.get_path(ids[3]))] == [503, 200]
    assert not standin.requests_to(case.get_path(calls[RECENT].conversation_id))  # before the window
    assert case.key not in done.stdout + done.stderr
    assert snapshot(down, ids) == snapshot(fed, ids)

    events = count(down, "SELECT count(*) FROM events")
    keyed = count(down, "SELECT count(*) FROM events WHERE event_type = ?", (case.keyed_event,))
    again = reconcile(case, standin, tmp_path, down, "--since", "3h")
    assert again.returncode == 0, again.stderr
    assert f"found {RECENT}, 0 missing or incomplete here" in again.stdout
    assert count(down, "SELECT count(*) FROM events") == events

    answers = await post(down, [body for call in recent for body in call.webhooks])
    assert sum(a["inserted"] + a["updated"] for a in answers) == 0
    assert snapshot(down, ids) == snapshot(fed, ids)
    if case.keyed_event:
        assert count(down, "SELECT count(*) FROM events WHERE event_type = ?", (case.keyed_event,)) == keyed


async def test_the_daemons_reconciler_fetches_a_call_that_started_here_and_went_quiet(
    db_path: Path, tmp_path: Path, vendor: tuple[VendorCase, StandIn, list[Call]]
) -> None:
    case, standin, calls = vendor
    quiet = calls[0]
    fed = tmp_path / "fed.db"
    await post_webhooks(fed, f"/webhooks/{case.name}", quiet.webhooks, settings=case.webhook_settings, sign=case.sign)
    settings = {**case.webhook_settings, **case.settings(standin), "reconcile.interval_s": 3600, "reconcile.grace_s": 0}
    app: Starlette = create_app(make_config(db_path, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
    ):
        for body in quiet.started:
            response = await client.post(f"/webhooks/{case.name}", content=body, headers=case.sign(body))
            assert response.status_code == 200, response.text
        await app.state.health.reconciler.run_pass()
        state = (await client.get("/readyz")).json()["reconcile"][case.name]
    assert state["recovered_messages"] >= count(fed, "SELECT count(*) FROM messages") > 0
    assert snapshot(db_path, [quiet.conversation_id]) == snapshot(fed, [quiet.conversation_id])
    assert case.key not in str(state)
