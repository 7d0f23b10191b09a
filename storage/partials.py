"""The temporary files a backup writes beside its target, and the removal of those a killed backup left.

A backup writes ``.NAME.partial-PID`` (and SQLite its ``-journal``) next to ``NAME``, and removes them
however it ends, unless it is killed outright (SIGKILL, the OOM killer, power loss): then they stay. The
next backup to the same ``NAME`` removes them, but only those whose writer is surely gone: no process
of that id runs here, and nobody holds the partial's lock (the writer holds an exclusive ``flock`` on it
from the moment it exists; a backup running in another PID namespace, a container, shows by its lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("transcriptd.backup")

SQLITE_SUFFIXES = ("-journal", "-wal", "-shm")


def partial_path(target: Path, pid: int | None = None) -> Path:
    return target.with_name(f".{target.name}.partial-{os.getpid() if pid is None else pid}")


def with_companions(partial: Path) -> tuple[Path, ...]:
    """The partial and the files SQLite may have made beside it."""
    return (partial, *(partial.with_name(partial.name + s) for s in SQLITE_SUFFIXES))


@contextmanager
def created(partial: Path) -> Iterator[None]:
    """Create ``partial`` (mode 0600, it must not exist) and hold its lock until the block ends, then remove
    it and its companions. The lock's descriptor is closed last: closing a descriptor of a file drops every
    POSIX lock this process holds on it, SQLite's included, so it must outlive SQLite's connections."""
    # Private from the start (the raw bodies hold secrets), whatever the umask: an empty file is an empty
    # database to SQLite, and its journal takes the same mode.
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        for leftover in with_companions(partial):
            leftover.unlink(missing_ok=True)
        os.close(fd)


def remove_stale(target: Path) -> list[Path]:
    """Remove the partials (and companions) of backups to ``target`` whose writer is gone; the removed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.partial-(\d+)(-journal|-wal|-shm)?")
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    pids = {int(m.group(1)) for m in map(pattern.fullmatch, names) if m is not None}
    removed: list[Path] = []
    for pid in sorted(pids):
        if _running(pid):
            continue
        partial = partial_path(target, pid)
        # A journal whose partial is already gone (killed between two unlinks) has no lock left to ask.
        if partial.exists() and not _lock_free(partial):
            continue  # its writer runs (elsewhere, another PID namespace): not ours to touch
        for leftover in with_companions(partial):
            if leftover.exists():
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
                log.info("removed %s, left by a backup that was killed", leftover)
    return removed


def _lock_free(partial: Path) -> bool:
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # the lock goes with it: the unlink that follows needs none
    return True


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True
