"""Reconcile's HTTP to the vendors (daemon.vendor_http) against a real local server, and the registry's API
client part for every source that declares one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.requests import Request
from starlette.responses import RedirectResponse

from daemon.reconcile_command import API_SOURCES
from daemon.sources import SOURCES
from daemon.sources.model import is_secret
from daemon.vendor_http import HttpPolicy, VendorApiError, VendorHttp, retry_after
from tests.vendor_standin import StandIn, app_for, serving

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parent.parent
KEY = "tavus-api-k3y-Secret"  # one of TEST_SECRETS: a log holding it fails the session
FAST = HttpPolicy(timeout_s=5.0, max_attempts=3, max_concurrency=2, backoff_s=0.01, max_wait_s=0.05)


class Echo(msgspec.Struct):
    ok: bool


def _ok(standin: StandIn, request: Request, body: Any) -> Any:
    return {"ok": True}


def _moved(standin: StandIn, request: Request, body: Any) -> Any:
    return RedirectResponse("http://127.0.0.2:9/elsewhere", status_code=302)


@pytest.fixture
def api() -> Iterator[StandIn]:
    standin = StandIn()
    app = app_for(
        standin,
        lambda request: request.headers.get("x-api-key") == KEY,
        [("GET", "/ok", _ok), ("POST", "/ok", _ok), ("GET", "/moved", _moved)],
    )
    with serving(standin, app):
        yield standin


def client(api: StandIn, key: str = KEY, policy: HttpPolicy = FAST) -> VendorHttp:
    return VendorHttp("tavus", api.base_url, {"x-api-key": key}, policy)


async def test_429_5xx_and_slow_answers_are_retried_until_an_answer(api: StandIn) -> None:
    api.fail("/ok", 429, retry_after="0")
    api.fail("/ok", 502)
    async with client(api) as http:
        assert (await http.get("/ok", Echo)).ok
        assert (http.stats.requests, http.stats.retries, http.stats.rate_limited) == (3, 2, 1)
    assert [s.status for s in api.seen] == [429, 502, 200]


async def test_a_request_slower_than_the_timeout_is_retried(api: StandIn) -> None:
    api.slow("/ok", 2.0)
    policy = HttpPolicy(timeout_s=0.5, max_attempts=2, backoff_s=0.01, max_wait_s=0.05)
    async with client(api, policy=policy) as http:
        assert (await http.post("/ok", Echo, {"a": 1})).ok
        assert http.stats.retries == 1


async def test_the_last_failure_is_named_retryable_and_a_4xx_is_not_retried(api: StandIn) -> None:
    api.fail("/ok", 503, times=3)
    async with client(api) as http:
        with pytest.raises(VendorApiError) as outage:
            await http.get("/ok", Echo)
    assert str(outage.value) == "tavus API GET /ok: HTTP 503 after 3 attempts"
    assert outage.value.retryable
    wrong = KEY + "-wrong"
    async with client(api, key=wrong) as http:
        with pytest.raises(VendorApiError) as refused:
            await http.get("/ok", Echo)
        assert http.stats.requests == 1
    assert str(refused.value) == "tavus API GET /ok: HTTP 401"
    assert not refused.value.retryable
    assert wrong not in str(refused.value)


async def test_a_redirect_is_not_followed_so_the_key_goes_nowhere_else(api: StandIn) -> None:
    async with client(api) as http:
        with pytest.raises(VendorApiError, match="HTTP 302"):
            await http.get("/moved", Echo)


async def test_a_closed_port_is_a_network_error_named_without_the_key() -> None:
    policy = HttpPolicy(timeout_s=1.0, max_attempts=2, backoff_s=0.01, max_wait_s=0.05)
    async with VendorHttp("tavus", "http://127.0.0.1:9", {"x-api-key": KEY}, policy) as http:
        with pytest.raises(VendorApiError) as failed:
            await http.get("/ok", Echo)
    assert re.fullmatch(r"tavus API GET /ok: \w+ after 2 attempts", str(failed.value))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("7", 1.0) == 7.0
    assert retry_after(None, 1.5) == 1.5
    assert retry_after("soon", 2.0) == 2.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < retry_after(later, 0.0) <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert retry_after(past, 5.0) == 0.0


@pytest.mark.parametrize("source", [s for s in SOURCES if s.api is not None], ids=lambda s: s.name)
def test_every_api_client_has_its_key_as_a_secret_its_url_its_command_and_its_docs(source: Any) -> None:
    settings = msgspec.structs.fields(source.settings)
    fields = {field.name: field for field in settings}
    assert is_secret(fields["api_key"].type), f"webhooks.{source.name}.api_key must be a Secret"
    assert fields["api_key"].default == ""
    assert str(fields["api_url"].default).startswith("https://")
    assert source.name in API_SOURCES
    assert source.api.calls
    readme = (REPO / "README.md").read_text()
    reconcile = readme[readme.index("## Reconcile") :]
    assert f"`webhooks.{source.name}.api_key`" in reconcile[: reconcile.index("\n## ")]
