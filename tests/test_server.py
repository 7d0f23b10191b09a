"""The server module's pure parts: rate-limited notices, connection limits under the open-file limit."""

from __future__ import annotations

import logging
import resource

import pytest

from daemon.server import FD_RESERVE, Notices, connection_limits, raise_fd_limit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_notices_log_once_per_period_and_say_how_many_since(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    notices = Notices(period_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="transcriptd.server"):
        assert notices.note("busy", "limit reached: %d open", 5)
        assert not any(notices.note("busy", "limit reached: %d open", 6) for _ in range(50))
        assert notices.note("other", "another kind")  # each kind has its own period
        clock.now += 10.0
        assert notices.note("busy", "limit reached: %d open", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "limit reached: 5 open",
        "another kind",
        "limit reached: 7 open (51 times in the last 10 s)",
    ]


def test_connection_limits_stay_below_the_open_file_limit(caplog: pytest.LogCaptureFixture) -> None:
    assert connection_limits(1024, 100_000) == (1024, 100_000 - FD_RESERVE)
    with caplog.at_level(logging.WARNING, logger="transcriptd.server"):
        served, hard = connection_limits(1024, 1024)
    assert hard == 1024 - FD_RESERVE
    assert served < hard < 1024
    assert "server.max_connections lowered from 1024 to" in caplog.text
    assert connection_limits(1, 10) == (1, 2)  # a tiny limit still serves one


def test_raise_fd_limit_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        raised = raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == now
        assert now == (hard if hard != resource.RLIM_INFINITY else max(256, 1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
