"""Outbound webhooks' state on PostgreSQL, on a real server: every function answers as SQLite's does for
the same changes and attempts, two replicas taking in and pruning at once stay correct, and one leader."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import notifications as lite_notifications
from storage.connection import open_writer
from storage.deliveries import Record
from storage.migrations import migrate
from storage.notifications import Attempted, Due
from storage.postgres import notifications
from storage.postgres.connection import Connection, connect
from storage.postgres.leader import NOTIFY_LEADER, Leader
from storage.postgres.writes import commit_batch as pg_commit_batch
from storage.writes import commit_batch as lite_commit_batch
from tests.test_change_feed import delivery
from tests.test_postgres_writes import run_together

NOW = 1_790_000_000.0
R1 = "https://one.example/hook"
R2 = "https://two.example/hook"

TABLES = {
    "notifications": "SELECT receiver, position, conversation_id, started_at, attempts, next_attempt_at,"
    " last_status, last_error, delivered_at, failed_at FROM notifications ORDER BY receiver, position",
    "notify_cursors": "SELECT receiver, position FROM notify_cursors ORDER BY receiver",
    "changes": "SELECT position, conversation_id FROM changes ORDER BY position",
}


def normal(answer: Any) -> Any:
    """An answer without the commit times (each backend's commit took its own ``time.time()``)."""
    if isinstance(answer, list):
        return [dataclasses.replace(a, committed_at=None) if isinstance(a, Due) else a for a in answer]
    if isinstance(answer, float) and answer > NOW + 10**6:  # oldest_change_at: when the test ran
        return "a commit time"
    return answer


class Both:
    """The same calls on SQLite and PostgreSQL; each call's answers, which must be equal."""

    def __init__(self, lite: sqlite3.Connection, pg: Connection) -> None:
        self.lite = lite
        self.pg = pg

    def commit(self, batch: list[Record]) -> None:
        lite_position = lite_commit_batch(self.lite, batch)[1]
        pg_position = pg_commit_batch(self.pg, batch)[1]
        assert pg_position == lite_position

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``name`` of both modules, with the connection where each module takes it."""
        lite_fn: Callable[..., Any] = getattr(lite_notifications, name)
        pg_fn: Callable[..., Any] = getattr(notifications, name)
        last = name in ("settle_and_take_in", "prune")
        on_lite = lite_fn(*args, self.lite, **kwargs) if last else lite_fn(self.lite, *args, **kwargs)
        on_pg = pg_fn(*args, self.pg, **kwargs) if last else pg_fn(self.pg, *args, **kwargs)
        assert normal(on_pg) == normal(on_lite), name
        return on_pg

    def in_transaction(self, name: str, *args: Any) -> Any:
        with self.pg.transaction():
            on_pg = getattr(notifications, name)(self.pg, *args)
        self.lite.execute("BEGIN IMMEDIATE")
        on_lite = getattr(lite_notifications, name)(self.lite, *args)
        self.lite.execute("COMMIT")
        assert on_pg == on_lite, name
        return on_pg

    def tables(self) -> None:
        for table, query in TABLES.items():
            assert self.pg.execute(query).fetchall() == self.lite.execute(query).fetchall(), table


def test_every_function_answers_as_sqlites(postgres_url: str, tmp_path: Path) -> None:
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    both = Both(lite, connect(postgres_url))
    try:
        both.commit([delivery("a", "c0", [0])])
        assert both.in_transaction("take_in", R1, NOW, 10) == 0  # a new receiver starts at the newest
        assert both.call("settle_and_take_in", [], [R1, R2], NOW, 10) is False
        both.commit([delivery("b", "c1", [0, 1]), delivery("c", "c2", [0])])
        both.commit([delivery("d", "c1", [2], status="ended"), delivery("e", "c3", [0])])
        both.commit([delivery("f", "c2", [1])])
        assert both.call("settle_and_take_in", [], [R2, R1], NOW, 2) is True
        assert both.call("settle_and_take_in", [], [R1, R2], NOW + 1, 2) is True
        assert both.call("settle_and_take_in", [], [R1, R2], NOW + 2, 2) is False
        due = both.call("due", R1, NOW + 5, 10)
        assert [d.conversation_id for d in due] == ["c1", "c2", "c3"]  # heads only: c1, c2 wait
        assert all(d.in_outbox for d in due)
        both.call("pending_stats", R1)
        c1, c2, c3 = due
        attempted = [
            Attempted(R1, c1.position, "c1", "delivered", NOW + 6, status=200),
            Attempted(R1, c2.position, "c2", "retry", NOW + 6, status=503, error="busy", next_attempt_at=NOW + 60),
            Attempted(R1, c3.position, "c3", "failed", NOW + 6, status=410, error="gone"),
            Attempted(R2, c1.position, "c1", "dropped", NOW + 6, error="erased"),
        ]
        assert both.call("settle_and_take_in", attempted, [R1, R2], NOW + 7, 10) is False
        both.call("due", R1, NOW + 10, 10)
        both.call("due", R1, NOW + 100, 1)
        both.call("due", R2, NOW + 10, 10)
        both.call("pending_stats", R2)
        assert both.call("undelivered", failed_only=True)
        assert both.call("undelivered", limit=3)
        both.tables()
        assert both.call("retry", NOW + 20, c3.position) == 2  # failed for one receiver, pending for the other
        assert both.call("retry", NOW + 20) == 0
        assert both.call("oldest_change_at") is not None
        # Delivered everywhere and old enough: pruned, with their delivered rows.
        while delivered := [
            Attempted(r, d.position, d.conversation_id, "delivered", NOW + 30, status=204)
            for r in (R1, R2)
            for d in notifications.due(both.pg, r, NOW + 1000, 100)
        ]:
            both.call("settle_and_take_in", delivered, [R1, R2], NOW + 30, 10)
        assert both.call("prune", 2**40, [R1, R2], limit=2) == 2
        assert both.call("prune", 2**40, [R1, R2]) > 0
        assert both.call("prune", 2**40, [R1, R2, "https://never.example/"]) == 0
        both.call("oldest_change_at")
        both.tables()
    finally:
        lite.close()
        both.pg.close()


def test_two_replicas_taking_in_at_once_owe_each_change_once(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        pg_commit_batch(conn, [delivery("seed", "c-seed", [0])])
        with conn.transaction():
            notifications.take_in(conn, R1, NOW, 10)
            notifications.take_in(conn, R2, NOW, 10)
    done = threading.Event()

    def writer() -> None:
        with connect(postgres_url) as conn:
            for i in range(60):
                batch = [delivery(f"k{i}-{j}", f"c{j}", [i]) for j in range(3)]
                pg_commit_batch(conn, batch)
        done.set()

    def taker(receivers: list[str]) -> int:
        rounds = 0
        with connect(postgres_url) as conn:
            while True:
                finished = done.is_set()
                more = notifications.settle_and_take_in([], receivers, NOW, 7, conn)
                rounds += 1
                if finished and not more:
                    return rounds

    run_together(writer, lambda: taker([R1, R2]), lambda: taker([R2, R1]))
    with connect(postgres_url) as conn:
        changes = [row[0] for row in conn.execute("SELECT position FROM changes WHERE position > 1 ORDER BY 1")]
        assert len(changes) == 60 * 3
        for receiver in (R1, R2):
            owed = conn.execute(
                "SELECT position FROM notifications WHERE receiver = %s ORDER BY position", (receiver,)
            ).fetchall()
            assert [row[0] for row in owed] == changes
        cursors = conn.execute("SELECT position FROM notify_cursors ORDER BY receiver").fetchall()
        assert cursors == [(changes[-1],), (changes[-1],)]


def test_two_first_take_ins_at_once_leave_one_cursor(postgres_url: str) -> None:
    with connect(postgres_url) as one, connect(postgres_url) as two:
        pg_commit_batch(one, [delivery("a", "c1", [0])])
        for i in range(10):
            receivers = [f"https://r{i}.example/"]
            taken = run_together(
                lambda r=receivers: notifications.settle_and_take_in([], r, NOW, 10, one),  # type: ignore[misc]
                lambda r=receivers: notifications.settle_and_take_in([], r, NOW, 10, two),  # type: ignore[misc]
            )
            assert taken == [False, False]
        assert one.execute("SELECT count(*), min(position), max(position) FROM notify_cursors").fetchone() == (10, 1, 1)


def test_two_replicas_pruning_at_once_delete_each_change_once(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        with conn.transaction():
            notifications.take_in(conn, R1, NOW, 10)
        for i in range(40):
            pg_commit_batch(conn, [delivery(f"k{i}-{j}", f"c{j}", [i]) for j in range(5)])
        while notifications.settle_and_take_in([], [R1], NOW, 1000, conn):
            pass
        conn.execute("UPDATE notifications SET delivered_at = 1.0")
        total = conn.execute("SELECT count(*) FROM changes").fetchone()
        assert total == (200,)

    def pruner() -> int:
        pruned = 0
        with connect(postgres_url) as conn:
            while n := notifications.prune(2**40, [R1], conn, limit=7):
                pruned += n
        return pruned

    counts = run_together(pruner, pruner)
    assert sum(counts) == 200
    with connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM changes").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM notifications").fetchone() == (0,)


# The session holding the leader lock in this test's database (an advisory key is two 32-bit halves).
HELD = """SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


def test_one_leader_at_a_time_and_the_next_takes_over_when_it_goes(postgres_url: str) -> None:
    with Leader(postgres_url) as a, Leader(postgres_url) as b:
        assert a.leads()
        assert not b.leads()
        assert a.leads()  # still: its session is alive
        a.close()
        assert b.leads()
        assert not a.leads()
        # The leader's session killed (a crash, a lost network): it finds out, the other takes over.
        with connect(postgres_url) as admin:
            key = (NOTIFY_LEADER >> 32, NOTIFY_LEADER & 0xFFFFFFFF)
            (pid,) = admin.execute(HELD, key).fetchone() or (0,)
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while admin.execute(HELD, key).fetchone():
                threading.Event().wait(0.01)
        assert not b.leads()
        assert a.leads()
        assert not b.leads()
