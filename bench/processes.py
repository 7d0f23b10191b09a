"""Starting and stopping the servers a bench measures: one way for every bench, on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from storage.backend import is_postgres_url

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 120.0

Log = IO[bytes] | int | None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(process: subprocess.Popen[Any], port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until ``port`` accepts connections; uvicorn binds only once the lifespan has started, so it is ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it listened on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {port} within {timeout_s:g} s")


def start_server(
    argv: Sequence[str], port: int, env: Mapping[str, str] | None = None, log: Log = None, root: Path = REPO
) -> subprocess.Popen[bytes]:
    """``python argv...`` from the repository (or the source tree ``root``), once it listens on ``port``;
    killed if it never does."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), environment.get("PYTHONPATH"))))
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=root, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        wait_listening(process, port)
    except BaseException:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        raise
    return process


def start_transcriptd(
    db: Path | str,
    *,
    ack: str = "durable",
    synchronous: str = "full",
    env: Mapping[str, str] | None = None,
    log: Log = None,
    root: Path = REPO,
) -> tuple[subprocess.Popen[bytes], int]:
    """``transcriptd serve`` on its defaults but for these, on a free loopback port: the process and the port.

    It logs at its default level, info: one line per delivery, as deployed, so that the figures include what
    the delivery log costs the daemon (building, masking, formatting and writing each line). Unless ``log``
    says otherwise the lines are written to /dev/null: a deployment's output goes to journald, another
    process with its own disk policy, while a file beside the database would put the log's disk writes into
    every commit's fsync (ext4 flushes other files' appended data with its journal).

    ``db``: a SQLite file, or a ``postgresql://`` URL (``storage.url``; replicas may share one).
    ``root``: the source tree to run, this repository's by default (``bench.overhead`` runs an older commit's).
    """
    port = free_port()
    storage = "TRANSCRIPTD_STORAGE_URL" if is_postgres_url(str(db)) else "TRANSCRIPTD_STORAGE_PATH"
    settings = {
        storage: str(db),
        "TRANSCRIPTD_SERVER_PORT": str(port),
        "TRANSCRIPTD_INGEST_ACK": ack,
        "TRANSCRIPTD_STORAGE_SYNCHRONOUS": synchronous,
        **(env or {}),
    }
    log = subprocess.DEVNULL if log is None else log
    return start_server(["-m", "daemon", "serve", "--config", os.devnull], port, settings, log, root), port


def stop(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then its exit code once it has drained; killed if it takes longer than ``timeout_s``."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
