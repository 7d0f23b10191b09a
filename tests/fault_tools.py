"""Real faults for the process tests: a small tmpfs (disk full, read-only), RSS sampling, fault accounting,
another process holding a transaction on the database.

Nothing here mocks transcriptd: the faults are the kernel's (ENOSPC, EROFS), the daemon a real process.
Mounting needs root (CAP_SYS_ADMIN); ``tmpfs`` skips the test, with the reason, where it is not allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.daemon_process import WEBHOOK, Daemon
from tests.payloads import encode, transcription_ready

MIB = 1024 * 1024


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name}(8) here: cannot make a small filesystem for the fault")
    return path


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("mount"), *args], capture_output=True, text=True, timeout=10, check=False)


def remount(mountpoint: Path, options: str) -> subprocess.CompletedProcess[str]:
    """``mount -o remount,<options>``: the completed process (check ``returncode``; EBUSY is a real answer)."""
    return _mount("-o", f"remount,{options}", str(mountpoint))


@contextmanager
def tmpfs(mountpoint: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` at ``mountpoint`` for the test, unmounted at the end whatever happened.

    Skips the test if mounting is not permitted here (not root, no CAP_SYS_ADMIN, a locked-down container).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = _mount("-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mountpoint))
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        umount = _tool("umount")
        undone = subprocess.run([umount, str(mountpoint)], capture_output=True, timeout=10, check=False)
        if undone.returncode != 0:  # still busy (a process we did not start?): detach it rather than leak it
            subprocess.run([umount, "-l", str(mountpoint)], capture_output=True, timeout=10, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, size: int) -> int:
    """Write a file of about ``size`` bytes (real pages: tmpfs allocates on write); returns what was written."""
    chunk = b"\xa5" * MIB
    written = 0
    with path.open("wb") as file:
        try:
            while written < size:
                written += file.write(chunk[: min(MIB, size - written)])
            file.flush()
        except OSError:  # the filesystem filled before ``size``: as full as it gets, which is the point
            pass
    return path.stat().st_size


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class RssSampler:
    """Samples a process's VmRSS every ``interval_s`` in a thread; ``peak_kib`` is the highest seen."""

    pid: int
    interval_s: float = 0.05
    samples: int = 0
    peak_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_kib(self.pid)
            if rss is None:
                return
            self.samples += 1
            self.peak_kib = max(self.peak_kib, rss)
            self._stop.wait(self.interval_s)


def post(daemon: Daemon, conversation_id: str, turns: int, timeout: float = 15.0) -> httpx.Response:
    with httpx.Client(base_url=daemon.base_url, timeout=timeout, trust_env=False) as client:
        return client.post(
            WEBHOOK,
            content=encode(transcription_ready(conversation_id, turns=turns)),
            headers={"content-type": "application/json"},
        )


def wait_readyz(daemon: Daemon, status: int, timeout: float) -> httpx.Response:
    """Poll /readyz until it answers ``status``; fails with the last answer and the daemon's log."""
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        last = daemon.readyz_response(timeout=5.0)
        if last is not None and last.status_code == status:
            return last
        time.sleep(0.1)
    seen = "no answer" if last is None else f"{last.status_code} {last.text}"
    raise AssertionError(
        f"/readyz did not answer {status} within {timeout:g} s (last: {seen}); log:\n{daemon.log_tail()}"
    )


@dataclass
class FaultReport:
    """What one fault test did and what it lost, printed at its end (``pytest -s``) for the closing note."""

    fault: str
    injected: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        self.hits[what] = self.hits.get(what, 0) + n

    def print(self) -> None:
        hits = ", ".join(f"{k}={v}" for k, v in self.hits.items())
        lines = [f"[fault] {self.fault}: injected {self.injected}x; {hits}; lost {self.lost}"]
        lines += [f"[fault]   {note}" for note in self.notes]
        print("\n" + "\n".join(lines))


def status_counts(statuses: Sequence[int | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        key = str(status)
        counts[key] = counts.get(key, 0) + 1
    return counts


@contextmanager
def ext4(image: Path, mountpoint: Path, size_mib: int = 64) -> Iterator[Path]:
    """A small ext4 filesystem on a loop device, mounted ``errors=remount-ro``: ``fail_filesystem`` then
    turns it read-only under open files, as a failing disk does. Skips where mounting is not permitted."""
    with image.open("wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    made = subprocess.run(
        [_tool("mkfs.ext4"), "-q", "-F", str(image)], capture_output=True, text=True, timeout=30, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image here: {made.stderr.strip()}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-o", "loop,errors=remount-ro", str(image), str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"mounting a loop device is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run([_tool("umount"), str(mountpoint)], capture_output=True, timeout=30, check=False)


def repair(image: Path) -> None:
    """fsck the image after the error, as an operator would before mounting it again."""
    subprocess.run([_tool("fsck.ext4"), "-fy", str(image)], capture_output=True, timeout=60, check=False)


@contextmanager
def ext4_again(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount an image made by ``ext4`` again, read-write."""
    mounted = _mount("-o", "loop,errors=remount-ro", str(image), str(mountpoint))
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield mountpoint
    finally:
        subprocess.run([_tool("umount"), str(mountpoint)], capture_output=True, timeout=30, check=False)


def fail_filesystem(mountpoint: Path) -> None:
    """Raise an ext4 error on the filesystem (its sysfs ``trigger_fs_error``): with ``errors=remount-ro``
    the kernel makes it read-only at once, open files included."""
    source = subprocess.run(
        [_tool("findmnt"), "-n", "-o", "SOURCE", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"{trigger} does not exist: this kernel cannot inject an ext4 error")
    trigger.write_text("transcriptd fault test\n")


# Begins the transaction it is given, reads (which takes a snapshot, or with BEGIN IMMEDIATE holds the write
# lock already), says so, and holds it until its stdin closes.
_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute(sys.argv[2])
conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
print("holding", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@contextmanager
def transaction_elsewhere(db_path: Path, begin: str = "BEGIN") -> Iterator[subprocess.Popen[str]]:
    """Another process holds a transaction (``BEGIN``: a read snapshot; ``BEGIN IMMEDIATE``: the write lock)
    until ``release`` or the end of the block."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db_path), begin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "holding"
            yield process
            if process.poll() is None:
                release(process)
        finally:
            if process.poll() is None:
                process.kill()


def release(process: subprocess.Popen[str]) -> None:
    """End the other process's transaction, and the process."""
    assert process.stdin is not None
    process.stdin.close()
    assert process.wait(10) == 0
