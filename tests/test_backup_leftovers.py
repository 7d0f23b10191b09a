"""A killed backup's temporary files are removed by the next backup to the same place, and only those.

The database is ~64 MiB copied one page per step: the backup spends a few hundred milliseconds copying,
and the test kills it (SIGKILL) the moment its temporary file appears, so it dies mid-copy.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.backup import backup
from storage.connection import open_writer
from storage.migrations import migrate
from tests.daemon_process import cli_argv, daemon_env, transcriptd

pytestmark = pytest.mark.sqlite_only("SQLite's backup API; a PostgreSQL database is backed up with pg_dump")

CONVERSATIONS = 16_000  # ~4 KB each: ~64 MiB


def make_database(path: Path, conversations: int = CONVERSATIONS) -> None:
    conn = open_writer(path)
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO conversations (id, source, created_at, updated_at, perception_analysis) "
            "VALUES (?, 'api', 0, 0, ?)",
            [(f"c{i}", "z" * 4000) for i in range(conversations)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def kill_mid_copy(db_path: Path, target: Path) -> int:
    """Start ``transcriptd backup``, SIGKILL it as soon as its temporary file exists; its pid."""
    argv = cli_argv("backup", str(target), "--step-pages", "1", "--db", str(db_path))
    with subprocess.Popen(argv, cwd=target.parent, env=daemon_env(), stdout=subprocess.DEVNULL) as process:
        try:
            deadline = time.monotonic() + 30
            while not leftovers(target.parent):
                assert process.poll() is None, "the backup ended before it was killed"
                assert time.monotonic() < deadline, "no temporary file appeared within 30 s"
                time.sleep(0.001)
        finally:
            process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        return process.pid


def test_the_next_backup_removes_what_a_killed_backup_left(tmp_path: Path) -> None:
    db_path = tmp_path / "transcriptd.db"
    make_database(db_path)
    backups = tmp_path / "backups"
    backups.mkdir()
    target = backups / "nightly.db"

    pid = kill_mid_copy(db_path, target)
    left = leftovers(backups)
    assert f".nightly.db.partial-{pid}" in left, left  # killed mid-copy: the temporary file stays
    assert not target.exists()

    done = transcriptd("backup", str(target), "--db", str(db_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stdout
    assert leftovers(backups) == []
    assert sorted(p.name for p in backups.iterdir()) == ["nightly.db"]
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT count(*) FROM conversations").fetchone() == (CONVERSATIONS,)


HOLDER = """
import fcntl, os, sys

path = os.path.join(sys.argv[1], f".nightly.db.partial-{os.getpid()}")
fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print(path, flush=True)
sys.stdin.read()
"""


def test_a_backup_leaves_the_temporary_files_of_running_backups_alone(tmp_path: Path) -> None:
    """Three partials: one of a running process (locked, as a running backup holds it), one whose process
    is gone but whose lock is held (a backup in another PID namespace), one truly stale (and its journal)."""
    db_path = tmp_path / "transcriptd.db"
    make_database(db_path, conversations=10)
    target = tmp_path / "nightly.db"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            running = Path(holder.stdout.readline().strip())
            gone_pid = dead_pid()
            elsewhere = tmp_path / f".nightly.db.partial-{gone_pid}"
            elsewhere.write_bytes(b"")
            stale_pid = dead_pid()
            stale = [
                tmp_path / f".nightly.db.partial-{stale_pid}",
                tmp_path / f".nightly.db.partial-{stale_pid}-journal",
            ]
            for path in stale:
                path.write_bytes(b"x")
            unrelated = tmp_path / ".other.db.partial-1"
            unrelated.write_bytes(b"")
            with open(elsewhere, "rb") as lock_holder:
                # flock from a second open file description conflicts like another process's would.
                fcntl.flock(lock_holder.fileno(), fcntl.LOCK_EX)
                done = backup(db_path, target)
            assert sorted(done.removed_leftovers) == sorted(stale)
            assert running.exists()
            assert elsewhere.exists()
            assert unrelated.exists()
            assert not any(path.exists() for path in stale)
        finally:
            if holder.poll() is None:
                holder.kill()


def dead_pid() -> int:
    """The id of a process that has run and been reaped (unlikely to be reused within the test)."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as process:
        process.wait(10)
    pid = process.pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    raise AssertionError(f"process {pid} still exists")
