"""Erasure on PostgreSQL, on a real server: the same answers and rows as SQLite's for the same deliveries
and erasures, and a write racing an erasure of its conversation never brings it back."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Any

from storage import erasure as lite_erasure
from storage.connection import open_writer
from storage.deliveries import WriteResult
from storage.erasure import Tombstone
from storage.migrations import migrate
from storage.postgres import erasure
from storage.postgres.connection import Connection, connect
from storage.postgres.writes import commit_batch as pg_commit_batch
from storage.writes import commit_batch as lite_commit_batch
from tests.test_postgres_writes import TABLES, append, comparable, ready, run_together, scenario

NOW = 1_790_000_000.0
CHANGES = "SELECT conversation_id, source, status, kinds, first_seq, last_seq FROM changes ORDER BY position"


def all_rows(query: Any) -> dict[str, list[tuple[Any, ...]]]:
    rows = {table: [tuple(map(comparable, row)) for row in query(sql)] for table, sql in TABLES.items()}
    rows["changes"] = [tuple(row) for row in query(CHANGES)]
    return rows


def untimed(found: Tombstone | None) -> Tombstone | None:
    """Without the time of the last drop (each backend's writer took its own ``time.time()``)."""
    return None if found is None else dataclasses.replace(found, last_dropped_at=None)


def test_erase_and_undo_answer_and_leave_the_same_rows_as_sqlite(postgres_url: str, tmp_path: Path) -> None:
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    pg = connect(postgres_url)
    for conn in (lite, pg):
        conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('c-erased', 1.0)")
    try:
        for batch in scenario():
            lite_commit_batch(lite, batch)
            pg_commit_batch(pg, batch)
        # A conversation with messages, one with only a dead letter, one never seen, and one erased twice.
        for cid in ["c-a", "c-g", "c-bad", "c-none", "c-a"]:
            on_lite = lite_erasure.erase(lite, cid, now=NOW)
            on_pg = erasure.erase(pg, cid, now=NOW)
            assert on_pg == on_lite, cid
        assert erasure.erase(pg, "c-none", now=NOW) is None
        erased = lite_erasure.erase(lite, "c-b", now=NOW)
        assert erased is not None
        assert erased.messages > 0
        assert erased.position is not None
        assert erasure.erase(pg, "c-b", now=NOW) == erased
        # A re-delivery after the erasure is dropped and counted on both.
        redelivered = [ready("c-b", turns=5), append("c-a", [{"role": "user", "content": "back?"}])]
        lite_outcomes, lite_position = lite_commit_batch(lite, redelivered)
        pg_outcomes, pg_position = pg_commit_batch(pg, redelivered)
        assert pg_outcomes == lite_outcomes
        assert all(isinstance(o, WriteResult) and o.erased for o in pg_outcomes)
        assert pg_position is lite_position is None
        for cid in ["c-a", "c-b", "c-bad", "c-none"]:
            assert untimed(erasure.tombstone(pg, cid)) == untimed(lite_erasure.tombstone(lite, cid)), cid
        ids = ["c-a", "c-b", "c-c", "c-erased", "c-none"]
        assert erasure.tombstoned(pg, ids) == lite_erasure.tombstoned(lite, ids) == {"c-a", "c-b", "c-erased"}
        assert erasure.tombstoned(pg, []) == set()
        assert all_rows(lambda sql: pg.execute(sql).fetchall()) == all_rows(lambda sql: lite.execute(sql).fetchall())
        # Undo: the tombstone goes, nothing comes back, and the next delivery is stored again.
        undone = erasure.undo(pg, "c-b")
        assert untimed(undone) == untimed(lite_erasure.undo(lite, "c-b"))
        assert undone is not None
        assert undone.dropped == 1
        assert erasure.undo(pg, "c-b") is lite_erasure.undo(lite, "c-b") is None
        assert pg_commit_batch(pg, [ready("c-b", turns=5)])[0] == lite_commit_batch(lite, [ready("c-b", turns=5)])[0]
        assert all_rows(lambda sql: pg.execute(sql).fetchall()) == all_rows(lambda sql: lite.execute(sql).fetchall())
    finally:
        lite.close()
        pg.close()


def test_count_dropped_adds_to_the_tombstones(postgres_url: str, tmp_path: Path) -> None:
    lite: sqlite3.Connection = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    try:
        with connect(postgres_url) as pg:
            for conn in (lite, pg):
                conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('x', 1.0), ('y', 1.0)")
            with pg.transaction():
                erasure.count_dropped(pg, {"y": 2, "x": 1, "z": 5}, 9.0)
                erasure.count_dropped(pg, {}, 9.0)
            with lite:
                lite_erasure.count_dropped(lite, {"y": 2, "x": 1, "z": 5}, 9.0)
            for cid in "xyz":
                assert erasure.tombstone(pg, cid) == lite_erasure.tombstone(lite, cid)
    finally:
        lite.close()


def stored(conn: Connection, cid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table, column in [("conversations", "id"), ("messages", "conversation_id"), ("events", "conversation_id")]:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (cid,)).fetchone()  # noqa: S608
        counts[table] = row[0] if row else 0
    return counts


def test_writes_racing_erasures_of_their_conversation_never_bring_it_back(postgres_url: str) -> None:
    rounds = 40
    with connect(postgres_url) as setup:
        # Half the conversations exist before the race (the writer queues on the row), half are created by it
        # (the erasure waits on the insert, or the writer finds the row gone and must see the tombstone).
        pg_commit_batch(setup, [ready(f"c-{i}", turns=2) for i in range(0, rounds, 2)])
    results: dict[str, Any] = {}

    def writer() -> None:
        with connect(postgres_url) as conn:
            for i in range(rounds):
                batch = [ready(f"c-{i}", turns=3, seed=1), append(f"c-{i}", [{"role": "user", "content": "late"}])]
                results[f"w{i}"] = pg_commit_batch(conn, batch)[0]

    def eraser() -> None:
        with connect(postgres_url) as conn:
            for i in range(rounds):
                results[f"e{i}"] = erasure.erase(conn, f"c-{i}")

    run_together(writer, eraser)
    with connect(postgres_url) as conn:
        for i in range(rounds):
            cid = f"c-{i}"
            outcomes = results[f"w{i}"]
            erased = results[f"e{i}"]
            left = stored(conn, cid)
            found = erasure.tombstone(conn, cid)
            if erased is None:  # the erasure ran first and found nothing: no tombstone, the write stored
                assert found is None
                assert not any(o.erased for o in outcomes)
                assert left["conversations"] == 1
                assert left["events"] == 2
                continue
            assert found is not None, cid
            assert left == {"conversations": 0, "messages": 0, "events": 0}, cid
            dropped = sum(1 for o in outcomes if o.erased)
            assert found.dropped == dropped, cid
            # Written first and erased after, or dropped whole: never half of a batch.
            assert dropped in (0, len(outcomes)), cid
            changes = conn.execute("SELECT kinds FROM changes WHERE conversation_id = %s", (cid,)).fetchall()
            assert changes == [('{"erased":1}',)], cid


def test_an_erasure_waits_for_a_conversation_being_created_and_erases_it(postgres_url: str) -> None:
    with connect(postgres_url) as writer, connect(postgres_url) as eraser:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('c-new', 'tavus', 1, 1)")
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(erasure.erase(eraser, "c-new", now=NOW)))
        thread.start()
        while not writer.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (eraser.info.backend_pid,)
        ).fetchone():
            thread.join(0.01)
        assert done == []  # a plain SELECT ... FOR UPDATE would have found nothing and returned None
        writer.execute("COMMIT")
        thread.join()
        (erased,) = done
        assert erased is not None
        assert erased.conversations == 1
        assert stored(writer, "c-new")["conversations"] == 0


def test_a_write_queued_behind_an_erasure_finds_the_tombstone(postgres_url: str) -> None:
    with connect(postgres_url) as setup:
        pg_commit_batch(setup, [ready("c-x", turns=2)])
    with connect(postgres_url) as eraser, connect(postgres_url) as writer:
        # An erasure's transaction, its statements as erase() runs them, held open before its COMMIT.
        eraser.execute("BEGIN")
        eraser.execute(erasure.LOCK_FOR_ERASURE, ("c-x", NOW, NOW))
        for _, statement in erasure.ERASED:
            eraser.execute(statement, ("c-x",))
        eraser.execute(erasure.TOMBSTONE, ("c-x", NOW))
        outcomes: list[Any] = []
        batch = [ready("c-x", turns=3, seed=1), append("c-x", [{"role": "user", "content": "late"}])]
        thread = threading.Thread(target=lambda: outcomes.append(pg_commit_batch(writer, batch)))
        thread.start()
        while not eraser.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (writer.info.backend_pid,)
        ).fetchone():
            thread.join(0.01)
        # The row is deleted when the writer's upsert goes on: it inserts it again, then must see the tombstone.
        eraser.execute("COMMIT")
        thread.join()
        ((results, position),) = outcomes
        assert [o.erased for o in results] == [True, True]
        assert position is None
        assert stored(writer, "c-x") == {"conversations": 0, "messages": 0, "events": 0}
        found = erasure.tombstone(writer, "c-x")
        assert found is not None
        assert found.dropped == 2
