"""Options and shared fixtures of the claims bench (bench/test_claims.py).

Only loaded when pytest is pointed at bench/: the project's configured test paths are tests/, so this
file never changes what ``make test`` collects or how it runs.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from bench.redis_cache import DEFAULT_URL, redis_available
from bench.roundtrip import DEFAULT_ROUND_TRIP_MS

# Logical database 15, flushed before and after each use: the bench must never touch data someone keeps
# in database 0 of a Redis that happens to run on this machine.
REDIS_URL = DEFAULT_URL
DEFAULT_E2E_WEBHOOKS = 64
E2E_CONCURRENCY = (1, 16, 64)
# Behind a 1 ms round trip no optimised system reaches the write-up's 144x end to end; 5 ms is where
# transcriptd crosses it. Measured at the highest concurrency only: naive-before alone takes ~36 s a round
# there (with the default 64 webhooks), and it gets as many rounds as every other member.
DEFAULT_E2E_LONG_ROUND_TRIP_MS = 5.0


def _milliseconds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of milliseconds: {text!r}") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected one or more round trips >= 0 ms, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("claims", "the write-up's claims, reproduced side by side (bench/test_claims.py)")
    group.addoption(
        "--round-trip-ms",
        type=float,
        default=DEFAULT_ROUND_TRIP_MS,
        help="simulated round trip per database statement and cache command, besides 0 "
        f"(default {DEFAULT_ROUND_TRIP_MS:g})",
    )
    group.addoption(
        "--e2e-round-trips-ms",
        type=_milliseconds,
        default=None,
        help="round trips for the end-to-end claim only, e.g. 0,1,5 (default: 0 and --round-trip-ms)",
    )
    group.addoption(
        "--e2e-long-round-trip-ms",
        type=float,
        default=DEFAULT_E2E_LONG_ROUND_TRIP_MS,
        help="one more round trip for the end-to-end claim, at the highest concurrency only; 0 leaves it out "
        f"(default {DEFAULT_E2E_LONG_ROUND_TRIP_MS:g})",
    )
    group.addoption(
        "--e2e-webhooks",
        type=_positive,
        default=DEFAULT_E2E_WEBHOOKS,
        help=f"transcripts sent per end-to-end round (default {DEFAULT_E2E_WEBHOOKS})",
    )


def _distinct(values: list[float]) -> list[float]:
    return sorted(set(values))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every claim runs on embedded SQLite as it is (0) and behind the simulated network round trip.
    if "round_trip_ms" in metafunc.fixturenames:
        values = _distinct([0.0, metafunc.config.getoption("--round-trip-ms")])
        metafunc.parametrize("round_trip_ms", values, ids=[f"rt{value:g}ms" for value in values])
    if "e2e_round_trip_ms" in metafunc.fixturenames:
        chosen: list[float] | None = metafunc.config.getoption("--e2e-round-trips-ms")
        every = _distinct(chosen or [0.0, metafunc.config.getoption("--round-trip-ms")])
        pairs = {(round_trip, concurrency) for round_trip in every for concurrency in E2E_CONCURRENCY}
        long_round_trip: float = metafunc.config.getoption("--e2e-long-round-trip-ms")
        if long_round_trip > 0:
            pairs.add((long_round_trip, max(E2E_CONCURRENCY)))
        ordered = sorted(pairs)
        metafunc.parametrize(
            ("e2e_round_trip_ms", "concurrency"), ordered, ids=[f"rt{rt:g}ms-c{c}" for rt, c in ordered]
        )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """The published JSON describes the machine (CPU, system, Python), never names it: drop the hostname."""
    machine_info.pop("node", None)


@pytest.fixture
def e2e_webhooks(request: pytest.FixtureRequest) -> int:
    webhooks: int = request.config.getoption("--e2e-webhooks")
    return webhooks


@pytest.fixture(scope="session")
def portal() -> Iterator[BlockingPortal]:
    """One event loop in a thread of its own, running across rounds: an app's lifespan (its writer, its
    background tasks) keeps running between the synchronous rounds pytest-benchmark times."""
    with start_blocking_portal("asyncio") as running:
        yield running


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """An event loop in the benchmark's own thread, for claims with no app to keep running: entering it
    costs far less than a hop to another thread, which matters for sub-millisecond rounds."""
    with asyncio.Runner() as loop:
        yield loop


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_unavailable(redis_url: str) -> str | None:
    """Why no Redis can be used (None when one answers at ``redis_url``)."""
    return asyncio.run(redis_available(redis_url))
