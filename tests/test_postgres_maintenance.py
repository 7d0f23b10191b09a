"""Retention, export, replay and dead letters on a real PostgreSQL: the same results as SQLite's modules for
the same deliveries, and retention run by several replicas at once (each conversation deleted once, a
conversation another transaction holds passed over, never waited for)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from daemon.sources import SOURCES
from storage import dead_letters as sqlite_dead_letters
from storage import export as sqlite_export
from storage import replay as sqlite_replay
from storage import retention as sqlite_retention
from storage.connection import open_writer
from storage.migrations import migrate
from storage.postgres import dead_letters as pg_dead_letters
from storage.postgres import export as pg_export
from storage.postgres import replay as pg_replay
from storage.postgres import retention as pg_retention
from storage.postgres.connection import Connection, connect
from storage.postgres.writes import write_batch as pg_write_batch
from storage.replay import Parse, ReplayLimits, StoredEvent
from storage.writes import write_batch as sqlite_write_batch
from tests.test_postgres_writes import NOW, TABLES, append, pg_rows, ready, rows_of, run_together, scenario

PARSERS: dict[str, Parse] = {source.name: source.replay for source in SOURCES}
# What a message's row holds that replay rebuilds: a corrupted entry and a lost one come back.
CORRUPT = "UPDATE messages SET content = 'wrong' WHERE conversation_id = 'c-a' AND seq = 3"
LOSE = "DELETE FROM messages WHERE conversation_id = 'c-b' AND seq = 1"
UNPARSABLE = (
    "INSERT INTO dead_letters (delivery_key, source, event_type, conversation_id, received_at, body, error,"
    " failed_at) VALUES ('k-garbage', 'tavus', 'application.transcription_ready', 'c-z', 1.0, {body}, 'old', 1.0)"
)


@pytest.fixture
def both(postgres_url: str, tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, Connection]]:
    """The scenario of tests/test_postgres_writes.py written through both backends."""
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    pg = connect(postgres_url)
    for conn in (lite, pg):
        conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('c-erased', 1.0)")
    try:
        for batch in scenario():
            sqlite_write_batch(lite, batch)
            pg_write_batch(pg, batch)
        yield lite, pg
    finally:
        lite.close()
        pg.close()


def sqlite_rows(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return rows_of(lambda sql: conn.execute(sql).fetchall())


def assert_same_rows(lite: sqlite3.Connection, pg: Connection, *, skip: tuple[str, ...] = ()) -> None:
    expected, stored = sqlite_rows(lite), pg_rows(pg)
    for table in TABLES:
        if table not in skip:
            assert stored[table] == expected[table], table


def conversation_ids(conn: sqlite3.Connection) -> list[str]:
    return [cid for (cid,) in conn.execute("SELECT id FROM conversations ORDER BY id")]


def test_the_exports_are_the_same_bytes(both: tuple[sqlite3.Connection, Connection]) -> None:
    lite, pg = both
    ids = conversation_ids(lite)
    assert len(ids) >= 7
    for cid in ids:
        head = sqlite_export.conversation(lite, cid)
        assert head is not None
        assert pg_export.conversation(pg, cid) == head
        for format in sqlite_export.FORMATS:
            expected = b"".join(sqlite_export.export(lite, head, format))
            assert b"".join(pg_export.export(pg, head, format)) == expected, (cid, format)
            assert expected or format == "jsonl"  # Markdown has a head even without messages
    assert pg_export.conversation(pg, "c-nothing") is None


def test_messages_are_read_in_chunks_in_stream_order(both: tuple[sqlite3.Connection, Connection]) -> None:
    lite, pg = both
    expected = list(sqlite_export.messages(lite, "c-a", chunk_rows=3))
    assert len(expected) > 6
    assert list(pg_export.messages(pg, "c-a", chunk_rows=3)) == expected


def test_replay_rebuilds_the_same_rows_with_the_same_stats(both: tuple[sqlite3.Connection, Connection]) -> None:
    lite, pg = both
    for conn in (lite, pg):
        conn.execute(CORRUPT)
        conn.execute(LOSE)
    failures: dict[str, list[tuple[int, str]]] = {"sqlite": [], "postgres": []}

    def on(name: str) -> Any:
        return lambda event, message: failures[name].append((event.id, message))

    limits = ReplayLimits(max_events=4)  # several batches
    on_sqlite = sqlite_replay.replay(lite, PARSERS, limits=limits, on_failure=on("sqlite"))
    on_postgres = pg_replay.replay(pg, PARSERS, limits=limits, on_failure=on("postgres"))
    assert on_postgres == on_sqlite
    assert on_sqlite.events > 10
    assert on_sqlite.inserted == 1
    assert on_sqlite.updated >= 1
    assert failures["postgres"] == failures["sqlite"]
    assert_same_rows(lite, pg)
    # Once more: the same rows again (a transcript re-delivered with changed entries is rewritten through
    # its versions on each replay, so updates are counted, the same on both).
    replayed = pg_rows(pg)
    again = pg_replay.replay(pg, PARSERS)
    assert again == sqlite_replay.replay(lite, PARSERS)
    assert again.inserted == 0
    assert again.events == on_postgres.events
    assert pg_rows(pg) == replayed
    assert_same_rows(lite, pg)


def test_replay_of_one_conversation_since_a_time_places_appends_where_they_were(
    both: tuple[sqlite3.Connection, Connection],
) -> None:
    lite, pg = both
    for conn in (lite, pg):
        conn.execute("UPDATE messages SET content = 'wrong' WHERE conversation_id = 'c-g'")
    on_sqlite = sqlite_replay.replay(lite, PARSERS, conversation_id="c-g", since=NOW + 12)
    on_postgres = pg_replay.replay(pg, PARSERS, conversation_id="c-g", since=NOW + 12)
    assert on_postgres == on_sqlite
    assert on_sqlite.events >= 3
    assert on_sqlite.updated >= 3
    assert_same_rows(lite, pg)
    assert pg_replay.has_events(pg, "c-g")
    assert not pg_replay.has_events(pg, "c-nothing")
    assert sqlite_replay.has_events(lite, "c-g")
    assert not sqlite_replay.has_events(lite, "c-nothing")
    nothing = pg_replay.replay(pg, PARSERS, conversation_id="c-nothing")
    assert nothing == sqlite_replay.replay(lite, PARSERS, conversation_id="c-nothing")
    assert nothing.events == 0


def test_replay_writes_no_event_again(both: tuple[sqlite3.Connection, Connection]) -> None:
    _lite, pg = both
    before = pg_rows(pg)["events"]
    stats = pg_replay.replay(pg, PARSERS)
    assert stats.events == len(before)
    assert pg_rows(pg)["events"] == before


def letters(conn: Any, module: Any) -> list[tuple[Any, ...]]:
    # Without error and failed_at: the database's words and the clock differ.
    return [
        (d.id, d.delivery_key, d.source, d.event_type, d.conversation_id, d.attempts)
        for d in module.list_unresolved(conn)
    ]


def test_dead_letters_list_and_retry_as_on_sqlite(both: tuple[sqlite3.Connection, Connection]) -> None:
    lite, pg = both
    garbage = b"not json"
    lite.execute(UNPARSABLE.format(body="?"), (garbage,))
    pg.execute(UNPARSABLE.format(body="%s"), (garbage,))
    listed = letters(lite, sqlite_dead_letters)
    assert [row[4] for row in listed] == ["c-bad", "c-big", "c-z"]
    assert letters(pg, pg_dead_letters) == listed

    one = pg_dead_letters.retry(pg, PARSERS, [2, 99])
    assert one == sqlite_dead_letters.retry(lite, PARSERS, [2, 99])
    assert one.unknown_ids == [99]
    assert [(o.id, o.status, o.inserted) for o in one.outcomes] == [(2, "stored", 3)]

    rest = pg_dead_letters.retry(pg, PARSERS)
    assert rest == sqlite_dead_letters.retry(lite, PARSERS)
    assert [(o.id, o.status) for o in rest.outcomes] == [(1, "stored"), (3, "failed")]
    assert rest.outcomes[1].error is not None
    assert rest.outcomes[1].error.startswith("the parser refuses it")
    assert (
        letters(pg, pg_dead_letters)
        == letters(lite, sqlite_dead_letters)
        == [(3, "k-garbage", "tavus", "application.transcription_ready", "c-z", 2)]
    )
    assert_same_rows(lite, pg, skip=("dead_letters",))


def test_a_dead_letter_stored_meanwhile_is_resolved_as_already_stored(
    both: tuple[sqlite3.Connection, Connection],
) -> None:
    _lite, pg = both
    refused = pg_dead_letters.list_unresolved(pg)[1]
    (row,) = pg.execute("SELECT body FROM dead_letters WHERE id = %s", (refused.id,)).fetchall()
    event = StoredEvent(
        refused.id,
        refused.delivery_key,
        refused.source,
        refused.event_type,
        refused.conversation_id,
        refused.received_at,
        bytes(row[0]),
    )
    pg_write_batch(pg, [PARSERS[refused.source](event)])  # the sender's retry, through another replica
    summary = pg_dead_letters.retry(pg, PARSERS, [refused.id])
    assert [(o.id, o.status) for o in summary.outcomes] == [(refused.id, "already_stored")]
    assert refused.id not in {d.id for d in pg_dead_letters.list_unresolved(pg)}


def age(conn: Any, cids: list[str], at: float, placeholder: str) -> None:
    for cid in cids:
        conn.execute(f"UPDATE conversations SET updated_at = {placeholder} WHERE id = {placeholder}", (at, cid))  # noqa: S608


def test_retention_plans_and_prunes_as_on_sqlite(both: tuple[sqlite3.Connection, Connection]) -> None:
    lite, pg = both
    old = ["c-a", "c-b", "c-g"]
    age(lite, old, 1000.0, "?")
    age(pg, old, 1000.0, "%s")
    cutoff = 2000.0
    plan = pg_retention.plan(pg, cutoff)
    assert plan == sqlite_retention.plan(lite, cutoff)
    assert plan.conversations == 3
    assert plan.messages > 20
    assert plan.events > 5
    total_lite = total_pg = sqlite_retention.Pruned()
    while (pruned := sqlite_retention.prune_batch_counts(lite, cutoff, max_conversations=2)).conversations:
        total_lite += pruned
    while (pruned := pg_retention.prune_batch_counts(pg, cutoff, max_conversations=2)).conversations:
        total_pg += pruned
    assert total_pg == total_lite
    assert astuple(total_pg) == (plan.conversations, plan.messages, plan.events)
    assert_same_rows(lite, pg)
    assert pg_retention.prune_batch(pg, cutoff) == 0
    with pytest.raises(ValueError, match="at least 1"):
        pg_retention.prune_batch(pg, cutoff, max_conversations=0)


OLD = 1_000.0
CUTOFF = 2_000.0


def fill(pg: Connection, old: int, young: int) -> None:
    batch = [ready(f"old-{i:03}", turns=3, at=OLD) for i in range(old)]
    batch += [ready(f"young-{i:03}", turns=3) for i in range(young)]
    pg_write_batch(pg, batch)


def test_two_replicas_pruning_at_once_delete_each_conversation_once(postgres_url: str) -> None:
    with connect(postgres_url) as pg:
        fill(pg, old=120, young=10)
        plan = pg_retention.plan(pg, CUTOFF)
    assert plan.conversations == 120

    def replica() -> sqlite_retention.Pruned:
        total = sqlite_retention.Pruned()
        with connect(postgres_url) as conn:
            while (pruned := pg_retention.prune_batch_counts(conn, CUTOFF, max_conversations=7)).conversations:
                total += pruned
        return total

    first, second = run_together(replica, replica)
    assert astuple(first + second) == (plan.conversations, plan.messages, plan.events)
    with connect(postgres_url) as pg:
        assert pg_retention.plan(pg, CUTOFF).conversations == 0
        left = [cid for (cid,) in pg.execute("SELECT id FROM conversations ORDER BY id")]
        assert left == [f"young-{i:03}" for i in range(10)]
        assert pg.execute("SELECT count(*) FROM messages").fetchone() == (10 * 4,)
        assert pg.execute("SELECT count(*) FROM events").fetchone() == (10,)


def test_a_conversation_a_writer_holds_is_passed_over_and_not_old_once_it_commits(postgres_url: str) -> None:
    with connect(postgres_url) as pg, connect(postgres_url) as writer:
        fill(pg, old=5, young=0)
        # A delivery to old-002 in flight: its group commit holds the conversation's row lock.
        with writer.transaction():
            writer.execute("UPDATE conversations SET updated_at = %s, rev = rev + 1 WHERE id = 'old-002'", (NOW,))
            # The prune neither waits for it nor deletes it.
            assert pg_retention.prune_batch(pg, CUTOFF) == 4
            assert pg_retention.prune_batch(pg, CUTOFF) == 0
        # Committed: refreshed, it is no longer old.
        assert pg_retention.prune_batch(pg, CUTOFF) == 0
        assert pg.execute("SELECT id FROM conversations").fetchall() == [("old-002",)]


def test_pruning_beside_writers_never_deadlocks_and_deletes_only_what_is_old(postgres_url: str) -> None:
    with connect(postgres_url) as pg:
        fill(pg, old=60, young=0)

    def writer() -> None:
        # New deliveries to old conversations, interleaved with the prunes: each one either finds its
        # conversation (and refreshes it) or finds it deleted (and starts it afresh).
        with connect(postgres_url) as conn:
            for i in range(0, 60, 2):
                pg_write_batch(conn, [append(f"old-{i:03}", [{"role": "user", "content": f"late {i}"}])])

    def replica() -> int:
        with connect(postgres_url) as conn:
            done = 0
            while pruned := pg_retention.prune_batch(conn, CUTOFF, max_conversations=3):
                done += pruned
            return done

    _, first, second = run_together(writer, replica, replica)
    assert first + second >= 30  # the odd ones no writer touched
    with connect(postgres_url) as pg:
        assert pg_retention.plan(pg, CUTOFF).conversations == 0
        late = pg.execute("SELECT conversation_id, content FROM messages WHERE content LIKE 'late %'").fetchall()
        assert sorted(late) == [(f"old-{i:03}", f"late {i}") for i in range(0, 60, 2)]
        # Every conversation left holds its late message: none was deleted after it was refreshed.
        for (cid,) in pg.execute("SELECT id FROM conversations").fetchall():
            assert int(cid[4:]) % 2 == 0
