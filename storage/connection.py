"""SQLite policy in one place: every connection transcriptd opens comes from here."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Synchronous = Literal["full", "normal"]

# UPSERT with several ON CONFLICT clauses and RETURNING need 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)


# A new database gets 16 KiB pages: a transcript commit is then ~4x fewer WAL frames (each one a header
# and a page written, and checksummed), which side by side at 64 durable senders took ~5 ms off the ack
# p99 and 0.7 ms off a 32-transcript commit. An existing database keeps the page size it was made with.
PAGE_SIZE = 16_384
# Checkpoints are the checkpointer's job; the writer's own is the backstop if it falls behind.
WRITER_AUTOCHECKPOINT_BYTES = 64 * 1024 * 1024
# The WAL size kept once a reader has let it grow: the writer truncates it to this when it restarts the WAL
# (journal_size_limit), and the checkpointer truncates it to nothing when it is larger. Under continuous
# heavy intake the WAL restarts only after the backstop checkpoint above (measured: 65 MiB at 32 durable
# senders of 200-turn transcripts), so the limit sits past that plus a large commit: it never truncates
# a WAL that is about to be reused, only one a reader has pinned.
WAL_KEEP_BYTES = WRITER_AUTOCHECKPOINT_BYTES + 16 * 1024 * 1024


class StorageVersionError(RuntimeError):
    pass


def check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        wanted = ".".join(map(str, MIN_SQLITE_VERSION))
        raise StorageVersionError(f"SQLite {sqlite3.sqlite_version} is too old: transcriptd needs {wanted}+")


def _apply_common(conn: sqlite3.Connection, *, cache_size_mib: int, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # A negative cache_size is in KiB: a large cache keeps the B-tree interior pages of the message key hot.
    conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_size_mib)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA temp_store = MEMORY")


def open_writer(
    path: str | Path,
    *,
    synchronous: Synchronous = "full",
    cache_size_mib: int = 64,
    busy_timeout_ms: int = 5000,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
) -> sqlite3.Connection:
    """The one read-write connection; owned by the writer, used from one thread at a time.

    ``factory`` is sqlite3's own hook for a Connection subclass: the bench uses it to add a simulated
    network round trip to every statement.
    """
    check_sqlite_version()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so a batch is exactly one transaction.
    # The multi-row statements come in a few padded sizes per table: keep them all prepared.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256, factory=factory)
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before the first table exists, or a no-op
        mode = conn.execute("PRAGMA journal_mode = wal").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot put {path} in WAL mode (got {mode})")
        # full: the commit survives power loss (fsync of the WAL at every commit); normal: only a process crash.
        conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_BYTES // page_size}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
        _apply_common(conn, cache_size_mib=cache_size_mib, busy_timeout_ms=busy_timeout_ms)
    except BaseException:
        conn.close()
        raise
    return conn


def open_checkpointer(path: str | Path, *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection that only runs WAL checkpoints, beside the writer."""
    check_sqlite_version()
    conn = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def open_reader(path: str | Path, *, cache_size_mib: int = 16, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A read-only connection: WAL readers never block the writer, and query_only guards against mistakes."""
    check_sqlite_version()
    conn = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False)
    try:
        _apply_common(conn, cache_size_mib=cache_size_mib, busy_timeout_ms=busy_timeout_ms)
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back if anything raises, the COMMIT included."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
