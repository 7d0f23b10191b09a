"""The WAL shrinks back once a reader that pinned it lets go, and the pin shows while it lasts.

A read transaction left open elsewhere (another process here: an operator's ``sqlite3`` shell) stops every
checkpoint at its snapshot, so the WAL grows with each commit, and SQLite keeps the file at its largest size.
The scale: some 100 MiB of WAL, past the 80 MiB the daemon keeps (``WAL_KEEP_BYTES``, above the WAL's
ordinary peak under heavy intake), so "back to small" cannot be the WAL's ordinary size; the pin lasts
past ``PIN_WARN_S`` for readiness to warn.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage.checkpointer import PIN_WARN_S, Checkpointer
from storage.connection import WAL_KEEP_BYTES, open_writer
from storage.migrations import migrate
from tests.conftest import AppClient
from tests.daemon_process import daemon_env
from tests.fault_tools import release, transaction_elsewhere
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.sqlite_only("the WAL file and its checkpoints")

GROW_TO_BYTES = WAL_KEEP_BYTES + 24 * 2**20
MAX_DELIVERIES = 3_000  # ~60 KiB of WAL each: the loop stops at GROW_TO_BYTES long before this
SHRINK_WITHIN_S = 60.0


def wal_size(db_path: Path) -> int:
    try:
        return Path(f"{db_path}-wal").stat().st_size
    except FileNotFoundError:
        return 0


def gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not among the metrics")


@pytest.mark.anyio
async def test_the_wal_shrinks_after_a_pinning_reader_ends_and_the_pin_shows(
    app_client: AppClient, db_path: Path
) -> None:
    async with app_client(**{"storage.synchronous": "normal"}) as client:
        assert (await client.post("/webhooks/tavus", content=encode(transcription_ready("w-0", turns=5)))).is_success
        with transaction_elsewhere(db_path) as reader:
            sent, started = 0, time.monotonic()
            while wal_size(db_path) < GROW_TO_BYTES:
                assert sent < MAX_DELIVERIES, wal_size(db_path)
                assert time.monotonic() - started < 120, (sent, wal_size(db_path))
                async with anyio.create_task_group() as tg:
                    for n in range(sent, sent + 8):
                        body = encode(transcription_ready(f"w-{n + 1}", turns=200, seed=n))
                        tg.start_soon(post_ok, client, body)
                sent += 8
            peak = wal_size(db_path)

            # The pin shows: the metrics at once, readiness (still ready) once it has lasted PIN_WARN_S.
            metrics = (await client.get("/metrics")).text
            assert gauge(metrics, "transcriptd_wal_bytes") >= GROW_TO_BYTES
            assert gauge(metrics, "transcriptd_wal_pinned_seconds") > 0
            warnings: list[str] = []
            with anyio.fail_after(PIN_WARN_S + 20):
                while not warnings:
                    ready = await client.get("/readyz")
                    assert ready.status_code == 200, ready.text
                    warnings = ready.json().get("warnings", [])
                    await anyio.sleep(0.5)
            assert "read transaction" in warnings[0]
            assert "MiB" in warnings[0]
            assert wal_size(db_path) >= peak  # nothing could shrink it meanwhile

            release(reader)
        # Idle from here on (only readiness probes commit): the checkpointer must still come back to it.
        deadline = time.monotonic() + SHRINK_WITHIN_S
        while wal_size(db_path) > 2**20 and time.monotonic() < deadline:  # noqa: ASYNC110 (a file: no event)
            await anyio.sleep(0.25)
        size = wal_size(db_path)
        waited = SHRINK_WITHIN_S - (deadline - time.monotonic())
        print(f"WAL peak {peak / 2**20:.0f} MiB; {size} bytes {waited:.1f} s after the reader closed")
        assert size < max(128 * 2**20, peak // 2)
        assert size <= 2**20, f"the WAL is still {size} bytes {SHRINK_WITHIN_S:g} s after the reader ended"
        metrics = (await client.get("/metrics")).text
        assert gauge(metrics, "transcriptd_wal_pinned_seconds") == 0
        assert gauge(metrics, "transcriptd_wal_bytes") <= 2**20
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert "warnings" not in ready.json()


async def post_ok(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/webhooks/tavus", content=body)
    assert response.status_code == 200, response.text


def test_the_writer_truncates_a_grown_wal_at_its_next_restart(tmp_path: Path) -> None:
    """Under intake the WAL shrinks without the checkpointer's TRUNCATE: the writer's journal_size_limit."""
    path = tmp_path / "t.db"
    writer = open_writer(path)
    migrate(writer)
    other = open_writer(path)  # a second connection, for the checkpoints and the pinning read
    try:
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM conversations").fetchone()
        padding = "x" * 4000
        for batch in range(48):  # ~96 MiB of WAL, past WAL_KEEP_BYTES
            writer.execute("BEGIN IMMEDIATE")
            writer.executemany(
                "INSERT INTO conversations (id, source, created_at, updated_at, perception_analysis) "
                "VALUES (?, 'api', 0, 0, ?)",
                [(f"c{batch}-{i}", padding) for i in range(500)],
            )
            writer.execute("COMMIT")
        grown = wal_size(path)
        assert grown > WAL_KEEP_BYTES
        other.execute("COMMIT")
        busy, frames, done = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, done) == (0, frames)
        assert wal_size(path) == grown  # a checkpoint alone gives nothing back
        writer.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('x', 'api', 0, 0)")
        assert wal_size(path) <= WAL_KEEP_BYTES
    finally:
        other.close()
        writer.close()


def test_an_export_into_a_stalled_pipe_does_not_hold_the_wal(tmp_path: Path) -> None:
    """``transcriptd export | slow-consumer``: the export blocks on its full pipe with most of the
    transcript unread. 3,000 messages of ~200 bytes make ~750 KB of JSON lines, far past a pipe's 64 KiB,
    and six chunks: the export is stalled mid-transcript while the test checkpoints beside it."""
    path = tmp_path / "t.db"
    conn = open_writer(path)
    migrate(conn)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('big', 'tavus', 0, 0)")
        conn.executemany(
            "INSERT INTO messages (conversation_id, source, seq, role, content, created_at) "
            "VALUES ('big', 'tavus', ?, 'user', ?, 0)",
            [(seq, f"turn {seq} " + "y" * 190) for seq in range(3000)],
        )
        conn.execute("COMMIT")
        argv = [sys.executable, "-m", "daemon", "export", "--db", str(path), "--conversation", "big"]
        with subprocess.Popen(argv, cwd=tmp_path, env=daemon_env(), stdout=subprocess.PIPE) as export:
            try:
                assert export.stdout is not None
                first = export.stdout.readline()  # it has started, and fills the pipe behind this line
                assert b'"seq":0' in first
                time.sleep(0.5)
                assert export.poll() is None  # still blocked on the pipe
                # A commit, then a TRUNCATE checkpoint that does not wait: it fails while any reader holds
                # a snapshot of the WAL.
                conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('n', 'api', 0, 0)")
                conn.execute("PRAGMA busy_timeout = 0")
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                assert busy == 0, "the stalled export holds a read transaction on the WAL"
                assert wal_size(path) == 0
                rest = export.stdout.read()
            finally:
                if export.poll() is None:
                    export.kill()
        assert export.returncode == 0
        assert len((first + rest).splitlines()) == 3000
    finally:
        conn.close()


@pytest.mark.anyio
async def test_the_checkpointer_reports_a_pin_and_truncates_once_it_ends(tmp_path: Path) -> None:
    """The same as the daemon test, on the checkpointer alone, with the time passed in and small sizes."""
    path = tmp_path / "t.db"
    writer = open_writer(path)
    migrate(writer)
    reader = sqlite3.connect(path, isolation_level=None)
    now = [1000.0]
    checkpointer = Checkpointer(path, interval_s=0.001, keep_bytes=2**20, recheck_s=0.01, clock=lambda: now[0])

    def truncations() -> int:  # read through a call: another task changes it
        return checkpointer.truncations

    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM conversations").fetchone()
        async with anyio.create_task_group() as tg:
            await tg.start(checkpointer.run)
            for batch in range(4):  # ~8 MiB of WAL, past keep_bytes
                writer.execute("BEGIN IMMEDIATE")
                writer.executemany(
                    "INSERT INTO conversations (id, source, created_at, updated_at, perception_analysis) "
                    "VALUES (?, 'api', 0, 0, ?)",
                    [(f"c{batch}-{i}", "p" * 4000) for i in range(500)],
                )
                writer.execute("COMMIT")
                checkpointer.notify()
            with anyio.fail_after(10):
                while checkpointer.pinned_since is None:  # noqa: ASYNC110 (another task's state)
                    await anyio.sleep(0.01)
            assert checkpointer.warning() is None  # pinned, but not for long yet
            now[0] += PIN_WARN_S
            assert checkpointer.pinned_s() == PIN_WARN_S
            warning = checkpointer.warning()
            assert warning is not None
            assert "10 s" in warning
            assert truncations() == 0  # nothing to truncate while the reader holds it

            reader.execute("COMMIT")  # nothing is committed from here on: the recheck alone must see it
            with anyio.fail_after(10):
                while not truncations():  # noqa: ASYNC110 (another task's state)
                    await anyio.sleep(0.01)
            assert wal_size(path) == 0
            assert checkpointer.pinned_s() == 0
            assert checkpointer.warning() is None
            checkpointer.stop()
    finally:
        reader.close()
        writer.close()
