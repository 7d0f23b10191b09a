"""Online backup with SQLite's backup API, safe beside a running daemon.

The copy is read from one snapshot: a read transaction is held on the source for the whole backup. In WAL
mode that blocks no writer, and it matters: without it, SQLite restarts a stepwise backup whenever another
connection commits, so under steady intake a backup would start over forever. So the backup holds exactly
what was committed when it began (every delivery acknowledged 200 by then), and never waits for the daemon.

The copy goes to a temporary file beside the target (mode 0600), is switched to a rollback journal (one
self-contained file, no ``-wal`` to carry along), checked, synced, and only then moved into place. The
temporary files of an earlier backup to the same target that was killed are removed first (see
``storage.partials``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from storage.connection import check_sqlite_version, open_reader
from storage.partials import created, partial_path, remove_stale

DEFAULT_STEP_PAGES = 1024  # pages per step: 16 MiB of a new database's 16 KiB pages, 4 MiB of 4 KiB ones


class BackupError(Exception):
    """The backup was not made; the message says why."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    conversations: int
    messages: int
    events: int
    size_bytes: int
    pages: int
    steps: int
    # Temporary files of killed backups to the same target, removed before this one began.
    removed_leftovers: tuple[Path, ...] = ()


def backup(
    source: str | Path,
    target: str | Path,
    *,
    force: bool = False,
    step_pages: int = DEFAULT_STEP_PAGES,
    busy_timeout_ms: int = 5000,
) -> BackupResult:
    """Copy the database at ``source`` to ``target``; refuse an existing ``target`` unless ``force``."""
    check_sqlite_version()
    source, target = Path(source), Path(target)
    if step_pages < 1:
        raise BackupError("the step must be at least 1 page")
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    if target.exists() and not force:
        raise BackupError(f"{target} already exists (use --force to replace it)")
    if target.exists() and target.is_dir():
        raise BackupError(f"{target} is a directory")
    with contextlib.suppress(FileNotFoundError):
        if target.resolve() == source.resolve():
            raise BackupError("the backup cannot replace the database itself")
    if not target.parent.is_dir():
        raise BackupError(f"the directory {target.parent} does not exist")

    removed = tuple(remove_stale(target))
    partial = partial_path(target)
    with created(partial):
        steps = _copy(source, partial, step_pages=step_pages, busy_timeout_ms=busy_timeout_ms)
        counts = _check(partial)
        _place(partial, target, force=force)
    conversations, messages, events, pages = counts
    return BackupResult(target, conversations, messages, events, target.stat().st_size, pages, steps, removed)


def _copy(source: Path, partial: Path, *, step_pages: int, busy_timeout_ms: int) -> int:
    src = open_reader(source, busy_timeout_ms=busy_timeout_ms)
    try:
        dst = sqlite3.connect(partial, isolation_level=None)
    except BaseException:
        src.close()
        raise
    steps = 0

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal steps
        steps += 1

    try:
        # The snapshot: the read transaction starts with the first read, and lasts until the copy is done.
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        src.backup(dst, pages=step_pages, progress=progress)
        src.execute("COMMIT")
        # The copy keeps the source's WAL mode in its header: make it one self-contained file, synced.
        dst.execute("PRAGMA journal_mode = DELETE")
        dst.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise BackupError(f"the backup failed: {exc}") from exc
    finally:
        src.close()
        dst.close()
    return steps


def _check(partial: Path) -> tuple[int, int, int, int]:
    conn = sqlite3.connect(f"{partial.resolve().as_uri()}?mode=ro", uri=True)
    try:
        result = conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise BackupError(f"the copy failed its check: {result[:5]}")
        (conversations,) = conn.execute("SELECT count(*) FROM conversations").fetchone()
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        (events,) = conn.execute("SELECT count(*) FROM events").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"the copy cannot be read back: {exc}") from exc
    finally:
        conn.close()
    return conversations, messages, events, pages


def _place(partial: Path, target: Path, *, force: bool) -> None:
    with partial.open("rb+") as file:
        os.fsync(file.fileno())
    if force:
        os.replace(partial, target)
    else:
        try:
            os.link(partial, target)  # never replaces: fails if the target appeared meanwhile
        except FileExistsError:
            raise BackupError(f"{target} already exists (use --force to replace it)") from None
        except OSError:
            # A file system without hard links: the check at the start has to do.
            if target.exists():
                raise BackupError(f"{target} already exists (use --force to replace it)") from None
            os.replace(partial, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
