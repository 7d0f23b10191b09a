"""The outbox on PostgreSQL, on a real server: the same changes as SQLite's for the same deliveries, and
positions that a reader polling ``position > after`` never skips while two writers commit at once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from storage import outbox as sqlite_outbox
from storage.connection import open_writer
from storage.deliveries import Record, WriteResult
from storage.errors import StorageUnavailable
from storage.migrations import migrate
from storage.postgres import outbox
from storage.postgres.connection import Connection, connect
from storage.postgres.writes import commit_batch as pg_commit_batch
from storage.writes import commit_batch as sqlite_commit_batch
from tests.postgres_tools import CommitCutter
from tests.test_change_feed import delivery
from tests.test_postgres_writes import append, ready, run_together, same_outcome, scenario

CHANGES = "SELECT conversation_id, source, status, kinds, first_seq, last_seq FROM changes ORDER BY position"


def pg_changes(conn: Connection) -> list[tuple[Any, ...]]:
    return conn.execute(CHANGES).fetchall()


def lite_changes(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(CHANGES).fetchall()


def both(postgres_url: str, tmp_path: Path) -> tuple[sqlite3.Connection, Connection]:
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    return lite, connect(postgres_url)


def test_the_same_batches_record_the_same_changes_as_on_sqlite(postgres_url: str, tmp_path: Path) -> None:
    lite, pg = both(postgres_url, tmp_path)
    for conn in (lite, pg):
        conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('c-erased', 1.0)")
    try:
        for batch in scenario():
            lite_outcomes, lite_position = sqlite_commit_batch(lite, batch)
            pg_outcomes, pg_position = pg_commit_batch(pg, batch)
            assert [same_outcome(o) for o in pg_outcomes] == [same_outcome(o) for o in lite_outcomes]
            assert pg_position == lite_position  # one writer: no gaps on either, so the same numbers
            assert pg_position == outbox.latest_position(pg)
        expected = lite_changes(lite)
        assert len(expected) > 10  # the scenario changed what it meant to
        assert pg_changes(pg) == expected
        # A batch of duplicates only records nothing on either.
        for batch in scenario()[:1]:
            assert sqlite_commit_batch(lite, batch)[1] is None
            assert pg_commit_batch(pg, batch)[1] is None
        assert pg_changes(pg) == expected
    finally:
        lite.close()
        pg.close()


def test_one_change_per_conversation_per_commit_with_counts_and_seq_range(postgres_url: str) -> None:
    # The SQLite outbox test's own batches (tests/test_change_feed.py), with its expected rows.
    with connect(postgres_url) as conn:
        batch = [delivery("a", "c1", [0, 1, 2]), delivery("b", "c1", [3, 4]), delivery("c", "c2", [0])]
        batch.append(delivery("d", "c1", [5], status="ended"))
        _, position = pg_commit_batch(conn, batch)
        assert pg_changes(conn) == [
            ("c1", "test", "ended", '{"messages_added":6,"created":1,"status":1}', 0, 5),
            ("c2", "test", "active", '{"messages_added":1,"created":1,"status":1}', 0, 0),
        ]
        assert position == 2
        _, position = pg_commit_batch(conn, [delivery("a", "c1", [0, 1, 2]), delivery("e", "c2", [0])])
        assert position is None
        batch = [delivery("f", "c1", [4, 5, 6], content="changed"), delivery("g", "c1", [7, 8])]
        _, position = pg_commit_batch(conn, batch)
        assert position == 3
        assert pg_changes(conn)[-1] == ("c1", "test", "ended", '{"messages_added":3,"messages_updated":2}', 4, 8)


def test_recording_off_records_nothing_and_write_batch_records(postgres_url: str) -> None:
    from storage.postgres.writes import write_batch

    with connect(postgres_url) as conn:
        outcomes, position = pg_commit_batch(conn, [delivery("a", "c1", [0, 1])], record_changes=False)
        assert position is None
        assert outcomes == [WriteResult(received=2, inserted=2, updated=0)]
        assert pg_changes(conn) == []
        write_batch(conn, [delivery("b", "c1", [2])])
        assert pg_changes(conn) == [("c1", "test", "active", '{"messages_added":1}', 2, 2)]


def test_a_refused_delivery_records_nothing_and_the_rest_of_its_commit_does(postgres_url: str) -> None:
    from tests.test_postgres_writes import out_of_range

    with connect(postgres_url) as conn:
        # Refused by the server itself: the savepoint path, each chunk recording its own changes.
        outcomes, position = pg_commit_batch(conn, [out_of_range("c-big"), delivery("ok", "c-ok", [0, 1])])
        assert [type(o).__name__ for o in outcomes] == ["StorageRejected", "WriteResult"]
        assert position is not None
        assert [(row[0], row[3]) for row in pg_changes(conn)] == [
            ("c-ok", '{"messages_added":2,"created":1,"status":1}')
        ]


def test_latest_position_counts_pruned_changes_and_starts_at_zero(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        assert outbox.latest_position(conn) == 0
        _, position = pg_commit_batch(conn, [delivery("a", "c1", [0]), delivery("b", "c2", [0])])
        assert position == outbox.latest_position(conn) == 2
        conn.execute("DELETE FROM changes")
        assert outbox.latest_position(conn) == 2


def test_latest_position_waits_for_a_change_still_being_committed(postgres_url: str) -> None:
    with connect(postgres_url) as writer, connect(postgres_url) as reader:
        writer.execute("BEGIN")
        outbox.take_order_lock(writer)
        writer.execute("INSERT INTO changes (conversation_id, source, kinds, committed_at) VALUES ('c', 's', '{}', 0)")
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(outbox.latest_position(reader)))
        thread.start()
        # The reader waits on the writer's lock: the position it would report is not committed yet.
        while not writer.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted",
            (reader.info.backend_pid,),
        ).fetchone():
            thread.join(0.01)
        assert seen == []
        writer.execute("COMMIT")
        thread.join()
        assert seen == [1]


def test_a_reader_polling_after_its_last_position_never_misses_one_while_two_writers_commit(
    postgres_url: str,
) -> None:
    done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        with connect(postgres_url) as conn:
            after = 0
            while True:
                finished = done.is_set()  # read before the poll: a last poll after the writers are done
                rows = conn.execute("SELECT position FROM changes WHERE position > %s ORDER BY position", (after,))
                positions = [row[0] for row in rows.fetchall()]
                seen.extend(positions)
                after = max(positions, default=after)
                if finished:
                    return

    def writer(name: str) -> list[int | None]:
        recorded: list[int | None] = []
        with connect(postgres_url) as conn:
            for i in range(100):
                # Conversations of their own, so the writers never queue on a row lock: only the outbox
                # orders them.
                batch: list[Record] = [ready(f"{name}-{i}-{j}", turns=3, seed=i) for j in range(3)]
                batch.append(append(f"{name}-shared", [{"role": "user", "content": f"{i}"}]))
                recorded.append(pg_commit_batch(conn, batch)[1])
        return recorded

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        returned = run_together(lambda: writer("x"), lambda: writer("y"))
    finally:
        done.set()
        watcher.join()
    with connect(postgres_url) as conn:
        stored = [row[0] for row in conn.execute("SELECT position FROM changes ORDER BY position").fetchall()]
    assert len(stored) == 2 * 100 * 4
    assert seen == stored  # every one, each once, in order
    assert sorted(p for part in returned for p in part if p is not None) == [p for p in stored if p % 4 == 0]


def test_erased_source_and_record_erased_mirror_sqlite(postgres_url: str, tmp_path: Path) -> None:
    lite, pg = both(postgres_url, tmp_path)
    try:
        sqlite_commit_batch(lite, [delivery("a", "c1", [0])])
        pg_commit_batch(pg, [delivery("a", "c1", [0])])
        assert outbox.erased_source(pg, "c1") == sqlite_outbox.erased_source(lite, "c1") == "test"
        assert outbox.erased_source(pg, "c-none") is sqlite_outbox.erased_source(lite, "c-none") is None
        with pg.transaction():
            position = outbox.record_erased(pg, "c1", "test", 5.0)
        assert position == 2
        assert pg_changes(pg)[-1] == ("c1", "test", None, '{"erased":1}', None, None)
    finally:
        lite.close()
        pg.close()


def test_a_deadlock_victim_retried_whole_records_its_changes_once(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(postgres_url) as setup:
        pg_commit_batch(setup, [ready("c-a", turns=1), ready("c-b", turns=1)])
    other = connect(postgres_url)
    writer = connect(postgres_url)
    writer.execute("SET deadlock_timeout = '100ms'")  # the writer checks first, so it is the victim
    other.execute("SET deadlock_timeout = '10s'")
    try:
        other.execute("BEGIN")
        other.execute("UPDATE conversations SET rev = rev WHERE id = 'c-b'")
        batch = [append("c-a", [{"role": "user", "content": "x"}]), append("c-b", [{"role": "user", "content": "y"}])]
        returned: list[int | None] = []
        thread = threading.Thread(target=lambda: returned.append(pg_commit_batch(writer, batch)[1]))
        thread.start()
        while not other.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (writer.info.backend_pid,)
        ).fetchone():
            thread.join(0.01)
        other.execute("UPDATE conversations SET rev = rev WHERE id = 'c-a'")  # the cycle: the writer is refused
        other.execute("COMMIT")
        thread.join()
        assert pg_changes(other)[2:] == [
            ("c-a", "tavus", "ended", '{"messages_added":1}', 0, 0),
            ("c-b", "tavus", "ended", '{"messages_added":1}', 0, 0),
        ]
        assert returned == [outbox.latest_position(other)]
        assert "batch retried whole after DeadlockDetected" in caplog.text
    finally:
        other.close()
        writer.close()


def test_a_lost_commit_raises_the_storage_error_and_records_nothing(postgres_url: str) -> None:
    with CommitCutter() as cutter:
        conn = connect(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{cutter.port}"))
        assert pg_commit_batch(conn, [ready("c-before", turns=2)])[1] == 1
        cutter.armed.set()
        with pytest.raises(StorageUnavailable, match="outcome is unknown"):
            pg_commit_batch(conn, [ready("c-lost", turns=2)])
        conn.close()
    with connect(postgres_url) as check:
        assert [row[0] for row in pg_changes(check)] == ["c-before"]
        # The lost transaction's position was handed out and never committed: a gap, never reused.
        assert pg_commit_batch(check, [ready("c-after", turns=2)])[1] == 3
        assert outbox.latest_position(check) == 3
