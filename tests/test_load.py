"""bench.load against real servers: transcriptd and the naive port as subprocesses, over loopback, on SQLite files.

The figures themselves are not asserted (they depend on the machine); what is: every acknowledged
conversation is found stored, the report says what it should, and a loss does not go unnoticed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.load import load, run_load, verify_stored
from bench.serve_naive import start_naive
from tests.daemon_process import REPO, Daemon, connect, daemon_env, managed, start_daemon, stored_messages

TURNS = 5
MESSAGES = TURNS + 1  # the system entry is stored too, as seq 0


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One durable daemon for the tests that only add conversations of their own (distinct id prefixes)."""
    workdir = tmp_path_factory.mktemp("durable")
    with managed(start_daemon(workdir, workdir / "transcriptd.db")) as daemon:
        yield daemon
        assert daemon.stop() == 0, daemon.log_tail()


def check_report(report: dict[str, Any], *, requests: int, status: str) -> dict[str, Any]:
    """The fields every verified run reports, consistent with one another; the results."""
    results: dict[str, Any] = report["results"]
    assert report["settings"]["requests"] == requests
    assert report["settings"]["messages_per_request"] == MESSAGES
    assert report["machine"]["cpus"] >= 1
    assert results["statuses"] == {status: requests}
    assert results["errors"]["total"] == 0
    assert results["ok"] == results["answered"] == requests
    latency = results["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    ack, stored = results["throughput"]["ack"], results["throughput"]["stored"]
    assert ack["requests"] == requests
    assert ack["messages"] == requests * MESSAGES
    assert ack["requests_per_s"] > 0
    assert ack["messages_per_s"] > 0
    assert stored is not None
    assert stored["messages"] == requests * MESSAGES
    assert stored["seconds"] >= ack["seconds"]
    assert results["verified"] is True
    assert results["lost"] == 0
    assert results["verification"]["error"] is None
    return results


def assert_all_stored(db_path: Path, prefix: str, count: int) -> None:
    """Independently of the verifier: each conversation of the run has all its rows, seq 0..MESSAGES-1."""
    stored = stored_messages(db_path)
    for i in range(count):
        got = stored.get(f"{prefix}-{i:06d}")
        assert got is not None
        assert (got.rows, got.min_seq, got.max_seq) == (MESSAGES, 0, MESSAGES - 1)


@pytest.mark.slow
def test_closed_loop_against_a_durable_daemon(durable: Daemon) -> None:
    report = load(
        durable.base_url,
        concurrency=4,
        requests=24,
        turns=TURNS,
        verify_db=durable.sqlite_path,
        id_prefix="closed",
        warmup=4,
    )
    results = check_report(report, requests=24, status="200")
    # A 200 is stored before its answer: both clocks stop at the last answer.
    assert results["throughput"]["stored"]["seconds"] == results["throughput"]["ack"]["seconds"]
    assert results["verification"]["checked"] == 24 + 4  # the warm-up conversations are verified too
    assert results["warmup"] == {"sent": 4, "statuses": {"200": 4}, "errors": 0}
    assert results["preexisting_conversations"] == 0
    assert_all_stored(durable.sqlite_path, "closed", 24)


@pytest.mark.slow
def test_enqueued_acks_are_verified_once_stored(tmp_path: Path) -> None:
    with managed(start_daemon(tmp_path, tmp_path / "transcriptd.db", ack="enqueued")) as daemon:
        report = load(
            daemon.base_url,
            concurrency=4,
            requests=24,
            turns=TURNS,
            verify_db=daemon.sqlite_path,
            verify_timeout_s=30.0,
            id_prefix="enqueued",
        )
        assert daemon.stop() == 0, daemon.log_tail()
    check_report(report, requests=24, status="202")
    assert_all_stored(tmp_path / "transcriptd.db", "enqueued", 24)


@pytest.mark.slow
def test_open_loop_sends_at_the_rate_whatever_the_answers(durable: Daemon) -> None:
    report = load(
        durable.base_url,
        mode="open",
        rate=20.0,
        duration_s=1.0,
        concurrency=4,
        turns=TURNS,
        verify_db=durable.sqlite_path,
        id_prefix="open",
    )
    check_report(report, requests=20, status="200")
    assert report["settings"]["mode"] == "open"
    assert report["results"]["errors"]["overflow"] == 0
    assert_all_stored(durable.sqlite_path, "open", 20)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "status"), [("before", "200"), ("after", "202")])
def test_against_the_naive_port(tmp_path: Path, variant: str, status: str) -> None:
    db_path = tmp_path / "naive.db"
    with (tmp_path / f"naive-{variant}.log").open("wb") as log:
        process, port = start_naive(db_path, "before" if variant == "before" else "after", log=log)
        try:
            report = load(
                f"http://127.0.0.1:{port}",
                concurrency=4,
                requests=16,
                turns=TURNS,
                verify_db=db_path,
                verify_timeout_s=30.0,
                id_prefix=f"naive-{variant}",
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    check_report(report, requests=16, status=status)
    assert_all_stored(db_path, f"naive-{variant}", 16)


@pytest.mark.slow
def test_verification_catches_missing_messages(durable: Daemon) -> None:
    report = load(
        durable.base_url, concurrency=2, requests=6, turns=TURNS, verify_db=durable.sqlite_path, id_prefix="loss"
    )
    assert report["results"]["verified"] is True
    ids = [f"loss-{i:06d}" for i in range(6)]
    with connect(durable.sqlite_path) as conn:  # as an operator's mistake would: one row of one, all of another
        conn.execute("DELETE FROM messages WHERE conversation_id = ? AND seq = ?", (ids[1], MESSAGES - 1))
        conn.execute("DELETE FROM messages WHERE conversation_id = ?", (ids[4],))

    # Nothing was answered 202, so nothing can still be on its way: it answers at once (were it to wait for
    # this timeout instead, the test would time out).
    answered_200 = verify_stored(durable.sqlite_path, dict.fromkeys(ids, MESSAGES), timeout_s=3600.0)
    assert answered_200.lost == [ids[1], ids[4]]
    assert not answered_200.verified
    assert answered_200.report()["lost"] == 2

    answered_202 = verify_stored(durable.sqlite_path, dict.fromkeys(ids, MESSAGES), pending=ids, timeout_s=0.3)
    assert answered_202.lost == [ids[1], ids[4]]
    assert answered_202.complete_after_s is None

    too_many = verify_stored(durable.sqlite_path, dict.fromkeys(ids[:1], MESSAGES - 1), timeout_s=0.0)
    assert too_many.excess == ids[:1]
    assert not too_many.verified


@pytest.mark.slow
def test_command_line_writes_the_json_report(durable: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "report" / "load.json"
    argv = [sys.executable, "-m", "bench.load", durable.base_url, "--requests", "6", "--concurrency", "2"]
    argv += ["--turns", str(TURNS), "--verify-db", str(durable.sqlite_path), "--id-prefix", "cli"]
    argv += ["--json", str(out), "--no-progress"]
    done = subprocess.run(argv, cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "verified: 6 acknowledged conversations checked, 0 lost" in done.stdout
    assert done.stderr == ""  # no progress line when asked not to
    report = json.loads(out.read_text())
    check_report(report, requests=6, status="200")
    assert report["settings"]["id_prefix"] == "cli"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "options",
    [{"mode": "sideways"}, {"mode": "open"}, {"mode": "open", "rate": 10.0, "duration_s": 0.01}, {"concurrency": 0}],
)
async def test_settings_that_cannot_run_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"mode|rate|nothing|concurrency"):
        await run_load("http://127.0.0.1:9", **options)
