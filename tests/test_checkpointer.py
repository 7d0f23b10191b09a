"""The checkpointer copies the WAL into the database after commits, and leaves an idle database alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from storage.checkpointer import Checkpointer
from storage.connection import open_writer
from storage.migrations import migrate

pytestmark = pytest.mark.sqlite_only("WAL checkpoints")


def commit_rows(path: Path, count: int) -> sqlite3.Connection:
    conn = open_writer(path)
    migrate(conn)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO conversations (id, source, created_at, updated_at) VALUES (?, 'api', 0, 0)",
        [(f"c{i}",) for i in range(count)],
    )
    conn.execute("COMMIT")
    return conn


def in_database_file(path: Path, scratch: Path) -> int:
    """Conversations in the database file alone, without its WAL: what checkpoints have copied there."""
    scratch.write_bytes(path.read_bytes())
    conn = sqlite3.connect(scratch)
    try:
        return int(conn.execute("SELECT count(*) FROM conversations").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema has been copied yet
        return 0
    finally:
        conn.close()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (the state belongs to another task: no event to wait on)
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_commit_is_followed_by_a_checkpoint_and_idle_time_by_none(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    writer = commit_rows(path, 200)
    try:
        checkpointer = Checkpointer(path, interval_s=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(checkpointer.run)
            await anyio.sleep(0.2)  # twenty intervals with nothing committed
            assert checkpointer.checkpoints == 0
            assert in_database_file(path, tmp_path / "copy.db") == 0

            checkpointer.notify()
            await wait_for(lambda: checkpointer.checkpoints == 1)
            checkpointer.stop()
        assert in_database_file(path, tmp_path / "copy.db") == 200
    finally:
        writer.close()


@pytest.mark.anyio
async def test_stop_runs_a_last_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    writer = commit_rows(path, 50)
    try:
        checkpointer = Checkpointer(path, interval_s=60.0)  # only stop() can bring the next one
        async with anyio.create_task_group() as tg:
            await tg.start(checkpointer.run)
            checkpointer.notify()
            await wait_for(lambda: checkpointer.checkpoints == 1)
            writer.execute(
                "INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('late', 'api', 0, 0)"
            )
            checkpointer.stop()
        assert checkpointer.checkpoints == 2
        assert in_database_file(path, tmp_path / "copy.db") == 51
    finally:
        writer.close()
