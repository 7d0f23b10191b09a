"""The daemon as operators run it: a real process, real HTTP over loopback, real signals, a real SQLite file
or PostgreSQL schema.

The promises checked: an answered 200 (durable) survives ``kill -9``; an answered 202 (enqueued) is
committed before a SIGTERM/SIGINT exit; a signal exits 0, in bounded time; a bad setting stops start-up
with exit code 2 naming it; a restart migrates nothing twice and keeps the data.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from storage.migrations import available
from tests.conftest import Storage, locked
from tests.daemon_process import (
    EXIT_TIMEOUT_S,
    WEBHOOK,
    Daemon,
    Load,
    Outcome,
    daemon_env,
    free_port,
    managed,
    missing_rows,
    serve_argv,
    start_daemon,
    stored_messages,
)
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.slow

ROWS = 101  # transcription_ready(turns=100): the system entry (seq 0) and 100 turns


def assert_no_partial_transcript(db_path: Path | str) -> None:
    """A delivery is one transaction: whatever is stored holds all of its rows, acknowledged or not."""
    stored = stored_messages(db_path).items()
    partial = {cid: s for cid, s in stored if (s.rows, s.min_seq, s.max_seq) != (ROWS, 0, ROWS - 1)}
    assert not partial, f"{len(partial)} conversation(s) stored in part, e.g. {list(partial.items())[:5]}"


def assert_acknowledged_are_stored(db_path: Path | str, acknowledged: list[str], what: str) -> None:
    missing = missing_rows(db_path, acknowledged, ROWS)
    assert not missing, (
        f"{len(missing)} of {len(acknowledged)} deliveries answered {what} are not stored: {missing[:10]}"
    )


def post_transcript(daemon: Daemon, conversation_id: str) -> httpx.Response:
    with httpx.Client(base_url=daemon.base_url, timeout=15.0, trust_env=False) as client:
        return client.post(
            WEBHOOK,
            content=encode(transcription_ready(conversation_id, turns=ROWS - 1)),
            headers={"content-type": "application/json"},
        )


def test_kill_9_loses_no_delivery_answered_200(tmp_path: Path, target: str) -> None:
    db_path = target
    with managed(start_daemon(tmp_path, db_path, ack="durable")) as daemon:
        load = Load(daemon.base_url, "kill9", senders=8, max_deliveries=3000, duration_s=15.0).start()
        load.wait_answered(200, 300, timeout=15.0)
        daemon.kill()  # SIGKILL, mid-stream: the senders are posting
        outcomes = load.join(timeout=20.0)

    acknowledged = [o.conversation_id for o in outcomes if o.status == 200]
    assert len(acknowledged) >= 300, load.summary()
    # Mid-stream: some deliveries were cut off by the kill (every sender stops at its first error).
    assert any(o.error is not None for o in outcomes), load.summary()
    assert {o.status for o in outcomes} <= {200, None}, load.summary()

    # The file as the kill left it (WAL and all), read as an operator would.
    assert_acknowledged_are_stored(db_path, acknowledged, "200 before the kill")
    assert_no_partial_transcript(db_path)

    # The daemon starts again on the same file, is ready, and a re-delivery of a stored transcript is a no-op.
    with managed(start_daemon(tmp_path, db_path, ack="durable", name="restarted")) as restarted:
        assert restarted.readyz() == 200
        again = post_transcript(restarted, acknowledged[0])
        assert again.status_code == 200, again.text
        assert again.json() == {
            "status": "stored",
            "received": ROWS,
            "inserted": 0,
            "updated": 0,
            "duplicates": ROWS,
            "rejected": 0,
            "duplicate": True,
        }
        restarted.stop(signal.SIGTERM)
    assert_acknowledged_are_stored(db_path, acknowledged, "200 before the kill (after a restart)")
    assert_no_partial_transcript(db_path)


@dataclass(frozen=True, slots=True)
class Stopped:
    outcomes: list[Outcome] = field(repr=False)
    summary: str
    returncode: int
    exit_s: float  # from the signal to the end of the process
    log: str = field(repr=False)


def signal_under_load(
    tmp_path: Path, target: str, *, ack: str, sig: signal.Signals, senders: int, answered_before: int, prefix: str
) -> Stopped:
    """Start a daemon, put it under load, send ``sig`` once ``answered_before`` deliveries were acknowledged."""
    acknowledged = 200 if ack == "durable" else 202
    with managed(start_daemon(tmp_path, target, ack=ack)) as daemon:
        load = Load(daemon.base_url, prefix, senders=senders, max_deliveries=3000, duration_s=15.0).start()
        load.wait_answered(acknowledged, answered_before, timeout=15.0)
        signalled = time.monotonic()
        daemon.send(sig)
        returncode = daemon.wait_exit(EXIT_TIMEOUT_S)
        exit_s = time.monotonic() - signalled
        outcomes = load.join(timeout=20.0)
        return Stopped(outcomes, load.summary(), returncode, exit_s, daemon.log_tail(60))


def check_stopped(stopped: Stopped, db_path: Path | str, *, acknowledged: int, at_least: int) -> None:
    outcomes = stopped.outcomes
    answered = [o.conversation_id for o in outcomes if o.status == acknowledged]
    assert len(answered) >= at_least
    # A valid transcript gets its ack, or 503 (retry) while shutting down, or no answer at all once closed.
    unexpected = [o for o in outcomes if o.status not in (acknowledged, 503, None)]
    assert not unexpected, f"unexpected answers: {unexpected[:10]}"
    assert_acknowledged_are_stored(db_path, answered, str(acknowledged))
    assert_no_partial_transcript(db_path)
    # A correctness bound (the drain must end), not a performance one.
    assert stopped.exit_s < EXIT_TIMEOUT_S
    assert stopped.returncode == 0, f"exit code {stopped.returncode}; log:\n{stopped.log}"


def test_sigterm_in_enqueued_mode_commits_every_delivery_answered_202_and_exits_0(tmp_path: Path, target: str) -> None:
    stopped = signal_under_load(
        tmp_path, target, ack="enqueued", sig=signal.SIGTERM, senders=8, answered_before=300, prefix="term-enq"
    )
    check_stopped(stopped, target, acknowledged=202, at_least=300)


def test_sigterm_in_durable_mode_keeps_every_delivery_answered_200_and_exits_0(tmp_path: Path, target: str) -> None:
    stopped = signal_under_load(
        tmp_path, target, ack="durable", sig=signal.SIGTERM, senders=8, answered_before=200, prefix="term-dur"
    )
    check_stopped(stopped, target, acknowledged=200, at_least=200)


def test_sigint_drains_and_exits_0(tmp_path: Path, target: str) -> None:
    stopped = signal_under_load(
        tmp_path, target, ack="enqueued", sig=signal.SIGINT, senders=3, answered_before=50, prefix="int-enq"
    )
    check_stopped(stopped, target, acknowledged=202, at_least=50)


@pytest.mark.parametrize(
    ("env", "config", "port_flag", "named"),
    [
        pytest.param({"TRANSCRIPTD_SERVER_PORT": "notaport"}, None, False, "server.port", id="env-bad-port"),
        pytest.param({"TRANSCRIPTD_SERVER_NOPE": "1"}, None, True, "TRANSCRIPTD_SERVER_NOPE", id="env-unknown"),
        pytest.param({}, "[server]\nnope = 1\n", True, "server.nope", id="file-unknown-key"),
        pytest.param({}, "[ingest]\nack = 'sometimes'\n", True, "ingest.ack", id="file-bad-value"),
    ],
)
def test_a_bad_setting_exits_2_naming_it_without_listening(
    tmp_path: Path, env: dict[str, str], config: str | None, port_flag: bool, named: str
) -> None:
    db_path = tmp_path / "never.db"
    args = ["--db", str(db_path)]
    if port_flag:  # a --port flag would override the bad port of the environment
        args += ["--port", str(free_port())]
    if config is not None:
        file = tmp_path / "bad.toml"
        file.write_text(config)
        args += ["--config", str(file)]
    done = subprocess.run(
        serve_argv(*args), cwd=tmp_path, env=daemon_env(env), capture_output=True, text=True, timeout=20, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert named in done.stderr, output
    assert done.stderr.startswith("transcriptd: "), output
    # It stopped before the server and the database: nothing was started, nothing created.
    assert "Started server process" not in output
    assert "Uvicorn running" not in output
    assert not db_path.exists()


def _not_sqlite(tmp_path: Path) -> Path:
    path = tmp_path / "notes.db"
    path.write_text("these are someone's notes, not a database\n")
    return path


def _a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "data.db"
    path.mkdir()
    return path


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "data").write_text("a file where the database's directory should be\n")
    return tmp_path / "data" / "transcriptd.db"


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        pytest.param(_not_sqlite, "file is not a database", id="not-sqlite"),
        pytest.param(_a_directory, "unable to open database file", id="a-directory"),
        pytest.param(_under_a_file, "FileExistsError", id="under-a-file"),
    ],
)
def test_an_unusable_database_exits_3_naming_it_in_one_line_without_listening(
    tmp_path: Path, make: Callable[[Path], Path], cause: str
) -> None:
    db_path = make(tmp_path)
    before = db_path.read_bytes() if db_path.is_file() else None
    done = subprocess.run(
        serve_argv("--db", str(db_path), "--port", str(free_port())),
        cwd=tmp_path,
        env=daemon_env({}),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert f"cannot use the database at {db_path}: " in done.stderr, output
    assert cause in done.stderr, output
    assert "Traceback" not in output
    assert "Started server process" not in output
    if before is not None:
        assert db_path.read_bytes() == before  # refused, not overwritten


def test_a_restart_applies_no_migration_twice_and_keeps_the_data(tmp_path: Path, storage: Storage) -> None:
    db_path = storage.target
    expected = [(m.version, m.name) for m in available()]

    def ledger() -> list[tuple[int, str, float]]:
        return storage.query("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")

    with managed(start_daemon(tmp_path, db_path, name="first")) as first:
        assert post_transcript(first, "before-restart").status_code == 200
        first.stop(signal.SIGTERM)
    if not storage.postgres:  # a PostgreSQL schema of the tests comes migrated
        assert "applied migrations" in first.log()
    applied = ledger()
    assert [(version, name) for version, name, _ in applied] == expected

    for n in range(2):
        with managed(start_daemon(tmp_path, db_path, name=f"restart-{n}")) as again:
            assert post_transcript(again, f"after-restart-{n}").status_code == 200
            again.stop(signal.SIGTERM)
        assert "applied migrations" not in again.log(), again.log_tail()
        assert ledger() == applied  # the same rows, applied_at and all: nothing was re-applied

    stored = stored_messages(db_path)
    for cid in ("before-restart", "after-restart-0", "after-restart-1"):
        assert stored[cid].rows == ROWS, stored.get(cid)


def test_shutdown_is_bounded_when_storage_keeps_failing(tmp_path: Path, target: str) -> None:
    """Enqueued deliveries that cannot be stored must not hold the process hostage past its budget."""
    env = {"TRANSCRIPTD_SERVER_SHUTDOWN_TIMEOUT_S": "3", "TRANSCRIPTD_STORAGE_BUSY_TIMEOUT_MS": "0"}
    with managed(start_daemon(tmp_path, target, ack="enqueued", env=env)) as daemon, locked(target):
        answer = httpx.post(
            f"{daemon.base_url}{WEBHOOK}", content=encode(transcription_ready("stuck", turns=3)), timeout=10
        )
        assert answer.status_code == 202
        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        daemon.wait_exit(timeout=15)
        took = time.monotonic() - started
    assert took < 10, f"the stop took {took:.1f} s with a 3 s budget"
    assert "not stored" in daemon.log() or "not drained" in daemon.log()
