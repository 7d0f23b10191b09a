"""The daemon as a real subprocess, and a bounded load of Tavus transcripts over loopback, for process tests.

Everything here is bounded in count and in time: a daemon that never gets ready, never exits, or a sender
that never returns fails the test (with the daemon's log) instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from storage.backend import is_postgres_url
from storage.portable import fetch_all
from tests.payloads import encode, transcription_ready

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WEBHOOK = "/webhooks/tavus"

READY_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 30.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else between our probe and the daemon's bind

# The conversation id is spliced into one pre-encoded body: the load generator spends no CPU on JSON.
_PLACEHOLDER = "@@conversation-id@@"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any TRANSCRIPTD_* of its own, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRANSCRIPTD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args]


def serve_argv(*args: str) -> list[str]:
    return cli_argv("serve", *args)


def transcriptd(
    *args: str, cwd: Path, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``transcriptd ARGS`` as a subprocess, in ``cwd`` (so no config.toml of the repository is read), with
    ``env`` added to the daemon's environment."""
    return subprocess.run(
        cli_argv(*args), cwd=cwd, env=daemon_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """The database file as an operator would open it, closed afterwards."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


def rows(target: Path | str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """``sql`` (``?`` placeholders) on the database ``target`` names: a SQLite file or a PostgreSQL URL."""
    target = str(target)
    if is_postgres_url(target):
        from storage.postgres.connection import connect as connect_postgres

        with connect_postgres(target) as pg:
            return fetch_all(pg, sql, params)
    with connect(Path(target)) as conn:
        return fetch_all(conn, sql, params)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Daemon:
    """One running ``transcriptd serve`` process."""

    process: subprocess.Popen[bytes]
    port: int
    db_path: Path | str  # the SQLite file, or the PostgreSQL URL it serves
    log_path: Path

    @property
    def target(self) -> str:
        """What it stores into: a SQLite file's path, or a postgresql:// URL."""
        return str(self.db_path)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file it serves (for tests that are SQLite's alone)."""
        assert not is_postgres_url(str(self.db_path)), self.db_path
        return Path(self.db_path)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def readyz_response(self, timeout: float = 2.0) -> httpx.Response | None:
        """The /readyz answer, or None if nothing answers."""
        try:
            with httpx.Client(trust_env=False, timeout=timeout) as client:
                return client.get(f"{self.base_url}/readyz")
        except httpx.HTTPError:
            return None

    def readyz(self) -> int | None:
        """The /readyz status code, or None if nothing answers."""
        response = self.readyz_response()
        return None if response is None else response.status_code

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonFailed(f"transcriptd exited with {self.process.returncode} before it was ready", self)
            if self.readyz() == 200:
                return
            time.sleep(0.05)
        raise DaemonFailed(f"transcriptd was not ready within {timeout:g} s", self)

    def send(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """The exit code (negative: killed by that signal); fails if the process has not ended by ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonFailed(f"transcriptd had not exited {timeout:g} s later; killed it", self) from None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = EXIT_TIMEOUT_S) -> int:
        self.send(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class DaemonFailed(AssertionError):
    def __init__(self, message: str, daemon: Daemon) -> None:
        super().__init__(f"{message}; log {daemon.log_path}:\n{daemon.log_tail()}")


def start_daemon(
    workdir: Path,
    db_path: Path | str,
    *,
    ack: str = "durable",
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "transcriptd",
    ready_timeout: float = READY_TIMEOUT_S,
) -> Daemon:
    """Start ``transcriptd serve --db db_path`` (a SQLite file, or a postgresql:// URL) on a free loopback
    port, and return once /readyz answers 200.

    It runs in ``workdir`` (so no ``config.toml`` of the repository is read), logging to a new file there.
    ``db_path`` is a SQLite file, or a ``postgresql://`` URL (a ``str``: a ``Path`` would fold its ``//``).
    """
    (daemon,) = start_daemons(workdir, db_path, [name], ack=ack, args=args, env=env, ready_timeout=ready_timeout)
    return daemon


def start_daemons(
    workdir: Path,
    db_path: Path | str,
    names: Sequence[str],
    *,
    ack: str = "durable",
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> list[Daemon]:
    """One daemon per name on the same storage, started together (replicas of one PostgreSQL database):
    each on a free port, returned once every one answers /readyz 200. None is left running on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    launch = partial(_launch, workdir, str(db_path), ack=ack, args=args, env=env)
    daemons = [launch(name) for name in names]
    try:
        for i, name in enumerate(names):
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    daemons[i].wait_ready(ready_timeout)
                except DaemonFailed:
                    daemons[i].kill()
                    if attempt < _START_ATTEMPTS and "address already in use" in daemons[i].log().lower():
                        daemons[i] = launch(name)
                        continue
                    raise
                break
    except BaseException:
        for daemon in daemons:
            daemon.kill()
        raise
    return daemons


def _launch(
    workdir: Path, target: str, name: str, *, ack: str, args: Sequence[str], env: Mapping[str, str] | None
) -> Daemon:
    port = free_port()
    log_path = _new_log(workdir, name)
    argv = serve_argv("--db", target, "--port", str(port), "--ack", ack, *args)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=workdir, env=daemon_env(env), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    return Daemon(process, port, target, log_path)


@contextmanager
def managed(daemon: Daemon) -> Iterator[Daemon]:
    """SIGKILL the daemon at the end if it is still running, whatever the test did: no process outlives a test."""
    try:
        yield daemon
    finally:
        daemon.kill()


def _new_log(workdir: Path, name: str) -> Path:
    for n in range(1, 1000):
        path = workdir / f"{name}-{n}.log"
        if not path.exists():
            return path
    raise AssertionError(f"too many logs in {workdir}")


# --- load ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one delivery: the status answered, or the exception instead of an answer."""

    conversation_id: str
    status: int | None
    error: str | None = None


@dataclass
class Load:
    """``senders`` threads posting distinct transcripts (one conversation id each) to one daemon.

    Bounded: at most ``max_deliveries`` in all, nothing sent after ``duration_s``, and a sender stops at
    its first transport error (the daemon is gone or going), or when ``stop()`` is called.
    """

    base_url: str
    prefix: str
    senders: int = 8
    turns: int = 100
    max_deliveries: int = 2000
    duration_s: float = 20.0
    request_timeout_s: float = 15.0
    outcomes: list[Outcome] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _next: int = 0

    def __post_init__(self) -> None:
        self._template = encode(transcription_ready(_PLACEHOLDER, turns=self.turns))
        self._deadline = 0.0

    @property
    def rows_per_delivery(self) -> int:
        return self.turns + 1  # the system entry is seq 0

    def start(self) -> Load:
        self._deadline = time.monotonic() + self.duration_s
        for n in range(self.senders):
            thread = threading.Thread(target=self._send, name=f"sender-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 30.0) -> list[Outcome]:
        """Wait for every sender to finish (they stop by themselves); the outcomes, in the order answered."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"senders still running {timeout:g} s later: {alive}"
        with self._changed:
            return list(self.outcomes)

    def answered(self, status: int) -> list[str]:
        """The conversation ids of the deliveries answered ``status`` so far."""
        with self._changed:
            return [o.conversation_id for o in self.outcomes if o.status == status]

    def wait_answered(self, status: int, count: int, timeout: float) -> int:
        """Wait until ``count`` deliveries were answered ``status``; fails on timeout or if the load ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                seen = sum(1 for o in self.outcomes if o.status == status)
                if seen >= count:
                    return seen
                remaining = deadline - time.monotonic()
                finished = not any(t.is_alive() for t in self._threads)
                if remaining <= 0 or finished:
                    raise AssertionError(
                        f"{seen} deliveries answered {status}, wanted {count} "
                        f"({'senders finished' if finished else f'after {timeout:g} s'}); {self.summary()}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def summary(self) -> str:
        """Counts of outcomes by status code or exception type, for failure messages."""
        counts: dict[str, int] = {}
        for outcome in list(self.outcomes):
            key = str(outcome.status) if outcome.status is not None else (outcome.error or "?").split("(")[0]
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{key}: {n}" for key, n in sorted(counts.items())) or "no outcome yet"

    def _claim(self) -> str | None:
        with self._changed:
            if self._stop.is_set() or self._next >= self.max_deliveries or time.monotonic() >= self._deadline:
                return None
            self._next += 1
            return f"{self.prefix}-{self._next:06d}"

    def _record(self, outcome: Outcome) -> None:
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    def _send(self) -> None:
        timeout = httpx.Timeout(self.request_timeout_s, connect=2.0)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        headers = {"content-type": "application/json"}
        placeholder = _PLACEHOLDER.encode()
        with httpx.Client(base_url=self.base_url, timeout=timeout, limits=limits, trust_env=False) as client:
            while (conversation_id := self._claim()) is not None:
                body = self._template.replace(placeholder, conversation_id.encode())
                try:
                    response = client.post(WEBHOOK, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    self._record(Outcome(conversation_id, None, f"{exc.__class__.__name__}({exc})"))
                    return
                self._record(Outcome(conversation_id, response.status_code))


# --- the database, as an operator sees it --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    rows: int
    min_seq: int
    max_seq: int


def stored_messages(db_path: Path | str) -> dict[str, Stored]:
    """Per conversation id: how many message rows the database (file or URL) holds, and their seq range."""
    found = rows(db_path, "SELECT conversation_id, COUNT(*), MIN(seq), MAX(seq) FROM messages GROUP BY conversation_id")
    return {cid: Stored(n, lo, hi) for cid, n, lo, hi in found}


def missing_rows(db_path: Path | str, conversation_ids: Sequence[str], rows_per_delivery: int) -> list[str]:
    """The acknowledged conversations that do not have all their rows, each with what the database has."""
    stored = stored_messages(db_path)
    complete = Stored(rows_per_delivery, 0, rows_per_delivery - 1)
    return [f"{cid}: {stored.get(cid)}" for cid in conversation_ids if stored.get(cid) != complete]
