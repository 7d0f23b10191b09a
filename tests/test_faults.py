"""Real faults against a real daemon: a full disk, a read-only filesystem, kill -9 at random moments, overload.

No mock of transcriptd: the faults come from the kernel (a small tmpfs that fills up, a read-only mount,
SIGKILL) or from load (ten times the rate the daemon sustains). Each test prints what it injected, how
many times, and what was lost (``pytest -s``): the promises are that nothing acknowledged is lost, that
every refusal is a 503 with Retry-After (never 4xx, never 500), and that the daemon recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.daemon_process import (
    EXIT_TIMEOUT_S,
    HOST,
    WEBHOOK,
    Daemon,
    Load,
    managed,
    missing_rows,
    start_daemon,
    stored_messages,
)
from tests.fault_tools import (
    MIB,
    FaultReport,
    RssSampler,
    ext4,
    ext4_again,
    fail_filesystem,
    fill,
    free_bytes,
    post,
    remount,
    repair,
    rss_kib,
    status_counts,
    tmpfs,
    wait_readyz,
)
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.slow

RETRYABLE_CODES = {"storage_unavailable", "overloaded", "commit_timeout", "shutting_down"}


@dataclass(frozen=True, slots=True)
class Answer:
    conversation_id: str
    status: int | None
    retry_after: str | None = None
    body: str = ""
    error: str | None = None


def answer(daemon: Daemon, conversation_id: str, turns: int) -> Answer:
    try:
        response = post(daemon, conversation_id, turns)
    except httpx.HTTPError as exc:
        return Answer(conversation_id, None, error=f"{exc.__class__.__name__}({exc})")
    return Answer(conversation_id, response.status_code, response.headers.get("retry-after"), response.text)


def check_retryable(answers: list[Answer]) -> None:
    """Every 503 says when to retry and claims nothing stored; nothing else but 200/202 was answered."""
    for a in answers:
        assert a.status in (200, 202, 503), f"{a.conversation_id}: {a.status} {a.error or a.body}"
        if a.status == 503:
            assert a.retry_after is not None, a
            assert a.retry_after.isdigit(), a
            assert '"stored"' not in a.body, a
            assert '"enqueued"' not in a.body, a
            assert any(f'"{code}"' in a.body for code in RETRYABLE_CODES), a


def assert_complete(db_path: Path, acknowledged: list[str], rows: int, what: str) -> None:
    missing = missing_rows(db_path, acknowledged, rows)
    assert not missing, (
        f"{len(missing)} of {len(acknowledged)} deliveries answered {what} are not stored: {missing[:10]}"
    )


def partial_transcripts(db_path: Path, rows: int) -> dict[str, object]:
    """Conversations stored in part: a delivery is one transaction, so there must be none."""
    return {
        cid: s for cid, s in stored_messages(db_path).items() if (s.rows, s.min_seq, s.max_seq) != (rows, 0, rows - 1)
    }


# --- 1. disk full -------------------------------------------------------------------------------------


@pytest.mark.sqlite_only("a filesystem under the database file that fills up or turns read-only")
def test_disk_full_answers_503_loses_nothing_acknowledged_and_recovers_by_itself(tmp_path: Path) -> None:
    report = FaultReport("disk full (tmpfs ENOSPC)")
    turns, rows = 100, 101
    with tmpfs(tmp_path / "disk", size_mib=32) as disk:
        db_path = disk / "transcriptd.db"
        env = {"TRANSCRIPTD_INGEST_ACK_TIMEOUT_S": "5"}
        with managed(start_daemon(tmp_path, db_path, ack="durable", env=env)) as daemon:
            before = [answer(daemon, f"before-{n}", turns) for n in range(5)]
            assert [a.status for a in before] == [200] * 5, before

            # The fault: a filler file takes all but ~2 MiB, and the senders fill the rest.
            filler = disk / "filler"
            fill(filler, free_bytes(disk) - 2 * MIB)
            report.injected += 1
            answers: list[Answer] = []
            deadline = time.monotonic() + 40
            n = 0
            with ThreadPoolExecutor(4) as pool:
                while sum(a.status == 503 for a in answers) < 20 and time.monotonic() < deadline:
                    ids = [f"full-{n + k:05d}" for k in range(8)]
                    n += len(ids)
                    answers += pool.map(lambda cid: answer(daemon, cid, turns), ids)
            check_retryable(answers)
            refused = [a for a in answers if a.status == 503]
            assert len(refused) >= 20, f"the disk never filled: {status_counts([a.status for a in answers])}"
            assert free_bytes(disk) < 2 * MIB
            report.count("posted_while_filling", len(answers))
            report.count("answered_503", len(refused))

            # While full, readiness says so (a real heartbeat commit that cannot be written).
            not_ready = wait_readyz(daemon, 503, timeout=10)
            assert not_ready.headers.get("retry-after"), not_ready.headers
            assert "storage_error" in not_ready.json(), not_ready.text
            report.notes.append(f"/readyz while full: {not_ready.json().get('storage_error')}")
            still = [answer(daemon, f"still-full-{k}", turns) for k in range(3)]
            check_retryable(still)
            assert all(a.status == 503 for a in still), still
            report.count("answered_503", len(still))

            # Free the space: the daemon recovers by itself, without a restart.
            filler.unlink()
            pid = daemon.pid
            wait_readyz(daemon, 200, timeout=15)
            after = [answer(daemon, f"after-{k}", turns) for k in range(5)]
            assert [a.status for a in after] == [200] * 5, after
            assert daemon.process.poll() is None
            assert daemon.pid == pid

            daemon.stop(signal.SIGTERM)
            assert daemon.process.returncode == 0, daemon.log_tail()

        acknowledged = [a.conversation_id for a in before + answers + still + after if a.status == 200]
        missing = missing_rows(db_path, acknowledged, rows)
        report.lost = len(missing)
        stored = stored_messages(db_path)
        refused_ids = [a.conversation_id for a in refused + still]
        report.notes.append(
            f"{len(acknowledged)} answered 200, all checked; "
            f"{sum(cid in stored for cid in refused_ids)} of {len(refused_ids)} answered 503 are in the database"
        )
        report.print()
        assert not missing, f"{len(missing)} deliveries answered 200 are not stored: {missing[:10]}"
        assert not partial_transcripts(db_path, rows)


# --- 2. read-only filesystem --------------------------------------------------------------------------


@pytest.mark.sqlite_only("a filesystem under the database file that fills up or turns read-only")
def test_read_only_filesystem(tmp_path: Path) -> None:
    """A read-only remount under the running daemon, else (Linux refuses it while the database is open for
    writing: EBUSY) the read-only filesystem the daemon meets at start-up; then rw again, and it works."""
    report = FaultReport("read-only filesystem")
    turns, rows = 20, 21
    with tmpfs(tmp_path / "disk", size_mib=32) as disk:
        db_path = disk / "transcriptd.db"
        with managed(start_daemon(tmp_path, db_path, ack="durable", name="rw")) as daemon:
            first = [answer(daemon, f"ro-before-{n}", turns) for n in range(5)]
            assert [a.status for a in first] == [200] * 5, first
            live = remount(disk, "ro")
            report.injected += 1
            if live.returncode == 0:
                try:
                    refused = [answer(daemon, f"ro-live-{n}", turns) for n in range(5)]
                    check_retryable(refused)
                    assert [a.status for a in refused] == [503] * 5, refused
                    report.count("answered_503", len(refused))
                    assert wait_readyz(daemon, 503, timeout=10).headers.get("retry-after")
                finally:
                    assert remount(disk, "rw").returncode == 0
                wait_readyz(daemon, 200, timeout=15)
                assert answer(daemon, "ro-live-after", turns).status == 200
                report.notes.append("live read-only remount: 503 + Retry-After, /readyz 503, recovered when rw")
            else:
                assert "busy" in live.stderr, live.stderr
                report.count("live_remount_refused_ebusy")
                report.notes.append(
                    "live `mount -o remount,ro` refused by the kernel (EBUSY: the db is open for writing); "
                    "tested the read-only filesystem at start-up instead"
                )
                assert daemon.readyz() == 200  # the refused remount did nothing to the daemon
            daemon.stop(signal.SIGTERM)
            assert daemon.process.returncode == 0, daemon.log_tail()

        # Read-only at start-up: the daemon must not come up claiming to be ready, nor take deliveries.
        assert remount(disk, "ro").returncode == 0
        report.injected += 1
        try:
            with (
                pytest.raises(AssertionError, match="exited with") as failed,
                managed(start_daemon(tmp_path, db_path, ack="durable", name="ro", ready_timeout=20)),
            ):
                pass  # pragma: no cover - reaching this is the failure
            report.count("startup_refused")
            report.notes.append(f"start-up on the read-only filesystem: {str(failed.value).splitlines()[0]}")
        finally:
            assert remount(disk, "rw").returncode == 0

        with managed(start_daemon(tmp_path, db_path, ack="durable", name="rw-again")) as again:
            after = [answer(again, f"ro-after-{n}", turns) for n in range(5)]
            assert [a.status for a in after] == [200] * 5, after
            again.stop(signal.SIGTERM)
        acknowledged = [a.conversation_id for a in first + after if a.status == 200]
        missing = missing_rows(db_path, acknowledged, rows)
        report.lost = len(missing)
        report.print()
        assert not missing
        assert not partial_transcripts(db_path, rows)


# --- 3. kill -9 at random moments ---------------------------------------------------------------------


@pytest.mark.sqlite_only(
    "SQLite's WAL recovery after kills at random moments (kill -9 on PostgreSQL: test_process, test_change_stream)"
)
def test_kill_9_at_random_moments_for_20_rounds_loses_nothing_answered_200(tmp_path: Path) -> None:
    report = FaultReport("kill -9 under load (durable)")
    rng = random.Random(20_251_124)
    db_path = tmp_path / "transcriptd.db"
    turns = 20
    acknowledged: list[str] = []
    cut_off = 0
    started = time.monotonic()
    for round_ in range(20):
        with managed(start_daemon(tmp_path, db_path, ack="durable", name=f"round-{round_:02d}")) as daemon:
            load = Load(
                daemon.base_url, f"r{round_:02d}", senders=4, turns=turns, max_deliveries=5000, duration_s=5.0
            ).start()
            time.sleep(rng.uniform(0.0, 0.8))
            daemon.kill()
            report.injected += 1
            outcomes = load.join(timeout=20.0)
        assert {o.status for o in outcomes} <= {200, None}, load.summary()
        acknowledged += [o.conversation_id for o in outcomes if o.status == 200]
        cut_off += sum(o.error is not None for o in outcomes)
        # Everything answered 200 in this round and every earlier one, complete, from the file as the kill left it.
        missing = missing_rows(db_path, acknowledged, turns + 1)
        assert not missing, f"round {round_}: {len(missing)} deliveries answered 200 are lost: {missing[:10]}"
        assert not partial_transcripts(db_path, turns + 1), f"round {round_}"
    report.count("answered_200", len(acknowledged))
    report.count("cut_off_by_the_kill", cut_off)
    report.notes.append(f"20 rounds in {time.monotonic() - started:.1f} s")
    report.print()
    assert len(acknowledged) > 100  # the kills did land under load


# --- 4. overload at ten times the sustainable rate ----------------------------------------------------


@dataclass
class OpenLoopResult:
    answers: list[Answer]
    offered: int  # requests scheduled
    sent: int  # requests actually sent (the rest: the client's own cap on connections was reached)
    seconds: float


def _request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _one(port: int, conversation_id: str, request: bytes, limit_s: float) -> Answer:
    """One request on its own connection: a cheap client, so that it is the daemon that saturates."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            raw = await reader.read()
    except (OSError, TimeoutError) as exc:
        return Answer(conversation_id, None, error=f"{exc.__class__.__name__}({exc})")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer(conversation_id, None, error=f"bad response {raw[:200]!r}")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    retry_after = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    return Answer(conversation_id, status, retry_after, body.decode(errors="replace"))


def _bodies(turns: int) -> tuple[bytes, bytes]:
    placeholder = "@@cid@@"
    return encode(transcription_ready(placeholder, turns=turns)), placeholder.encode()


def conversation_for(n: int) -> str:
    # One in four deliveries goes to one of 4 hot conversations (their mailboxes fill); the rest are new.
    return f"hot-{n % 16 // 4}" if n % 4 == 0 else f"ovl-{n:07d}"


async def closed_loop(port: int, turns: int, workers: int, seconds: float) -> tuple[list[Answer], float]:
    template, placeholder = _bodies(turns)
    answers: list[Answer] = []
    counter = iter(range(10**9))
    end = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            cid = f"cl-{next(counter):07d}"
            answers.append(await _one(port, cid, _request(WEBHOOK, template.replace(placeholder, cid.encode())), 10))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return answers, time.monotonic() - started


async def open_loop(port: int, turns: int, rate: float, seconds: float, max_open: int) -> OpenLoopResult:
    """Requests scheduled at ``rate`` whatever the answers (open loop): a request whose time has come is sent
    at once, on a new connection; if ``max_open`` are already open, it is counted offered and not sent."""
    template, placeholder = _bodies(turns)
    answers: list[Answer] = []
    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    sent = 0

    async def send(cid: str) -> None:
        answers.append(await _one(port, cid, _request(WEBHOOK, template.replace(placeholder, cid.encode())), 30))

    started = time.monotonic()
    end = started + seconds
    n = 0
    while n < total and (now := time.monotonic()) < end:
        due = min(total, int((now - started) * rate) + 1)
        while n < due:  # behind schedule: what is due goes now (or is dropped at the cap), never later
            if len(tasks) < max_open:
                task = asyncio.create_task(send(conversation_for(n)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            n += 1
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
    await asyncio.gather(*tasks)
    return OpenLoopResult(answers, total, sent, time.monotonic() - started)


def test_overload_at_ten_times_the_sustainable_rate(tmp_path: Path) -> None:
    report = FaultReport("overload 10x (enqueued, max_inflight_mib=1, mailbox_size=2)")
    turns, rows = 20, 21
    db_path = tmp_path / "transcriptd.db"
    env = {
        "TRANSCRIPTD_INGEST_MAX_INFLIGHT_MIB": "1",
        "TRANSCRIPTD_INGEST_MAILBOX_SIZE": "2",
        "TRANSCRIPTD_SERVER_LOG_LEVEL": "warning",
    }
    with managed(start_daemon(tmp_path, db_path, ack="enqueued", env=env)) as daemon:
        idle_kib = rss_kib(daemon.pid)
        assert idle_kib is not None
        with RssSampler(daemon.pid, interval_s=0.02) as rss:
            measured, measured_s = asyncio.run(closed_loop(daemon.port, turns, workers=8, seconds=2.0))
            sustainable = sum(a.status == 202 for a in measured) / measured_s
            assert sustainable > 10, status_counts([a.status for a in measured])
            result = asyncio.run(open_loop(daemon.port, turns, rate=10 * sustainable, seconds=5.0, max_open=1000))
        report.injected += 1
        assert daemon.process.poll() is None, daemon.log_tail()
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert client.get(f"{daemon.base_url}/livez").status_code == 200
        answers = measured + result.answers
        counts = status_counts([a.status for a in result.answers])
        check_retryable(answers)
        assert counts.get("503", 0) > 0, f"the limits never bit: {counts}"
        peak_over_idle_mib = (rss.peak_kib - idle_kib) / 1024
        assert peak_over_idle_mib < 500, f"RSS rose {peak_over_idle_mib:.0f} MiB above idle"

        daemon.stop(signal.SIGTERM, timeout=EXIT_TIMEOUT_S)
        assert daemon.process.returncode == 0, daemon.log_tail()

    acknowledged = sorted({a.conversation_id for a in answers if a.status == 202})
    missing = missing_rows(db_path, acknowledged, rows)
    report.lost = len(missing)
    report.count("offered", result.offered)
    report.count("sent", result.sent)
    report.count("answered_202", len(acknowledged))
    report.count("answered_503", counts.get("503", 0))
    report.notes.append(
        f"sustainable {sustainable:.0f}/s (closed loop, 8 connections); "
        f"offered {result.offered / result.seconds:.0f}/s for {result.seconds:.1f} s, "
        f"sent {result.sent / result.seconds:.0f}/s ({result.sent / result.seconds / sustainable:.1f}x); "
        f"answers {counts}"
    )
    report.notes.append(
        f"RSS idle {idle_kib / 1024:.0f} MiB, peak {rss.peak_kib / 1024:.0f} MiB ({rss.samples} samples)"
    )
    report.print()
    assert not missing, f"{len(missing)} of {len(acknowledged)} deliveries answered 202 are not stored: {missing[:10]}"
    assert not partial_transcripts(db_path, rows)
    assert os.path.exists(db_path)


@pytest.mark.sqlite_only("a filesystem under the database file that fills up or turns read-only")
def test_filesystem_turning_read_only_under_the_daemon(tmp_path: Path) -> None:
    """The disk fails under a serving daemon and the kernel remounts it read-only (ext4 errors=remount-ro):
    every answer is a retryable 503, /readyz says why, and nothing acknowledged before is lost."""
    report = FaultReport("filesystem read-only under the daemon")
    turns, rows = 20, 21
    mountpoint = tmp_path / "ext4"
    with ext4(tmp_path / "disk.img", mountpoint) as disk:
        db_path = disk / "transcriptd.db"
        with managed(start_daemon(tmp_path, db_path, ack="durable", name="ext4")) as daemon:
            before = [answer(daemon, f"ext4-before-{n}", turns) for n in range(5)]
            assert [a.status for a in before] == [200] * 5, before
            fail_filesystem(disk)
            report.injected += 1
            refused = [answer(daemon, f"ext4-ro-{n}", turns) for n in range(5)]
            check_retryable(refused)
            assert [a.status for a in refused] == [503] * 5, refused
            report.count("answered_503", len(refused))
            not_ready = wait_readyz(daemon, 503, timeout=10)
            assert not_ready.headers.get("retry-after")
            assert not_ready.json()["storage_error"]
            daemon.stop(signal.SIGTERM)
        acknowledged = [a.conversation_id for a in before]
    # The fault clears the way a failed disk's does: unmounted, checked, mounted again; then a restart.
    repair(tmp_path / "disk.img")
    with ext4_again(tmp_path / "disk.img", mountpoint) as disk:
        db_path = disk / "transcriptd.db"
        with managed(start_daemon(tmp_path, db_path, ack="durable", name="ext4-again")) as again:
            assert answer(again, "ext4-after", turns).status == 200
            again.stop(signal.SIGTERM)
        missing = missing_rows(db_path, [*acknowledged, "ext4-after"], rows)
        report.lost = len(missing)
        report.print()
        assert not missing
        assert not partial_transcripts(db_path, rows)
