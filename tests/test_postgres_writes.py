"""The PostgreSQL group commit on a real server: the same rows and outcomes as SQLite's for the same
deliveries, and what several writers at once must not break (exactly once, gapless appends, no deadlock,
a refused delivery alone, a lost commit answered as a storage fault)."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from daemon.sources import elevenlabs, generic, retell, tavus, vapi
from storage.connection import open_writer
from storage.deliveries import Record, WriteResult
from storage.errors import StorageRejected, StorageUnavailable
from storage.migrations import migrate
from storage.postgres.connection import Connection, connect
from storage.postgres.writes import Outcome, unstorable
from storage.postgres.writes import write_batch as pg_write_batch
from storage.writes import write_batch as sqlite_write_batch
from tests.payloads import encode, envelope, transcription_ready
from tests.postgres_tools import CommitCutter

FIXTURES = Path(__file__).parent / "fixtures"
NOW = 1_790_000_000.0


def ready(cid: str, turns: int = 10, seed: int = 0, at: float = NOW) -> Record:
    return tavus.parse(encode(transcription_ready(cid, turns=turns, seed=seed)), {}, received_at=at)[0]


def event(cid: str, event_type: str, properties: dict[str, Any], at: float = NOW) -> Record:
    return tavus.parse(encode(envelope(cid, event_type, properties)), {}, received_at=at)[0]


def append(cid: str, messages: list[dict[str, Any]], at: float = NOW) -> Record:
    return generic.parse(json.dumps(messages).encode(), {}, received_at=at, conversation_id=cid)[0]


def vendor(parse: Callable[..., tuple[Record, Any]], path: str, at: float = NOW) -> Record:
    return parse((FIXTURES / path).read_bytes(), {}, received_at=at)[0]


def with_metadata(delivery: Record, metadata: dict[str, str]) -> Record:
    return replace(delivery, metadata=json.dumps(metadata))


def scenario() -> list[list[Record]]:
    """Batches covering what a group commit meets: new conversations, status events, every vendor's shape,
    appends with and without client ids, re-deliveries, a changed transcript, the same delivery twice in
    one batch, metadata merges, a refused delivery and an erased conversation."""
    surrogate = append("c-bad", [{"role": "user", "content": "fine"}], at=NOW + 20)
    (row,) = surrogate.append_rows
    surrogate = replace(surrogate, append_rows=[(*row[:3], "lone \ud800 surrogate", *row[4:])])
    return [
        [
            with_metadata(ready("c-a", turns=20), {"team": "a"}),
            ready("c-b", turns=5),
            event("c-a", "system.replica_joined", {"replica_id": "r-1"}),
            append("c-g", [{"role": "user", "content": "one", "id": "m1"}, {"role": "assistant", "content": "two"}]),
            append("c-g", [{"role": "user", "content": "three", "timestamp": NOW - 5}], at=NOW + 1),
            vendor(vapi.parse, "vapi/events-end-of-call-report.json"),
            vendor(retell.parse, "retell/call_ended.json"),
            vendor(elevenlabs.parse, "elevenlabs/post_call_transcription.json"),
            ready("c-c", turns=3),
            ready("c-c", turns=3),  # the same delivery twice in one batch
        ],
        [
            ready("c-a", turns=20),  # a re-delivery
            ready("c-b", turns=5, seed=1, at=NOW + 10),  # the same positions, changed entries
            ready("c-b", turns=5, seed=2, at=NOW + 11),  # and again in the same batch
            append("c-g", [{"role": "user", "content": "one, edited", "id": "m1"}], at=NOW + 12),
            append("c-g", [{"role": "user", "content": "four", "id": "m4"}], at=NOW + 13),
            with_metadata(event("c-a", "system.shutdown", {"shutdown_reason": "done"}, at=NOW + 14), {"x": "1"}),
            with_metadata(event("c-a", "system.replica_joined", {"replica_id": "r-2"}, at=NOW + 15), {"team": "b"}),
            # Past 32 keys: this delivery's keys are dropped whole; the next one's merge again.
            with_metadata(event("c-a", "system.pal_joined", {}, at=NOW + 17), {f"k{i}": "v" for i in range(31)}),
            with_metadata(event("c-a", "application.recording_ready", {}, at=NOW + 18), {"y": "2"}),
            surrogate,
            vendor(vapi.parse, "vapi/events-status-update.json", at=NOW + 16),
        ],
        [
            ready("c-erased", turns=2, at=NOW + 30),
            append("c-g", [{"role": "user", "content": "five"}], at=NOW + 31),
        ],
        # Refused by the database itself (a position past 64 bits): both backends write this batch again
        # one delivery per savepoint, and keep the others.
        [ready("c-d", turns=2, at=NOW + 40), out_of_range("c-big"), append("c-g", [{"role": "user", "content": "6"}])],
    ]


def out_of_range(cid: str) -> Record:
    delivery = ready(cid, turns=2, at=NOW + 41)
    return replace(delivery, rows=[*delivery.rows[:1], (*delivery.rows[1][:2], 2**70, *delivery.rows[1][3:])])


TABLES = {
    "conversations": "SELECT id, source, status, replica_id, shutdown_reason, started_at, ended_at, message_count,"
    " last_message_at, recording_uri, recording_provider, recording_duration, recording_error,"
    " perception_analysis, perception_unavailable_reason, created_at, updated_at, end_reason, analysis, metadata"
    " FROM conversations ORDER BY id",
    "messages": "SELECT conversation_id, source, seq, role, content, timestamp, seconds_from_start, duration,"
    " inference_id, vendor_role, external_id, created_at FROM messages ORDER BY conversation_id, source, seq",
    # Per conversation in id order: the order replay reads them in.
    "events": "SELECT delivery_key, source, event_type, conversation_id, received_at, body, problems"
    " FROM events ORDER BY conversation_id, id",
    "dead_letters": "SELECT delivery_key, source, event_type, conversation_id, received_at, body, attempts,"
    " resolved_at FROM dead_letters ORDER BY delivery_key",
    "tombstones": "SELECT conversation_id, deleted_at, dropped FROM tombstones ORDER BY conversation_id",
}


def comparable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)  # metadata: the same object, whichever backend spelled it
        except ValueError:
            return value
    return value


def rows_of(query: Callable[[str], Sequence[Sequence[Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    return {table: [tuple(map(comparable, row)) for row in query(sql)] for table, sql in TABLES.items()}


def same_outcome(outcome: Outcome) -> object:
    return "rejected" if isinstance(outcome, StorageRejected) else outcome


def pg_rows(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    return rows_of(lambda sql: conn.execute(sql).fetchall())


def test_a_batchs_rows_and_outcomes_equal_sqlites(postgres_url: str, tmp_path: Path) -> None:
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    pg = connect(postgres_url)
    for conn in (lite, pg):
        conn.execute("INSERT INTO tombstones (conversation_id, deleted_at) VALUES ('c-erased', 1.0)")
    try:
        for batch in scenario():
            on_sqlite = [same_outcome(o) for o in sqlite_write_batch(lite, batch)]
            on_postgres = [same_outcome(o) for o in pg_write_batch(pg, batch)]
            assert on_postgres == on_sqlite
        expected = rows_of(lambda sql: lite.execute(sql).fetchall())
        stored = pg_rows(pg)
        for table in TABLES:
            assert stored[table] == expected[table], table
        assert len(stored["messages"]) > 40  # the scenario wrote what it meant to
        assert stored["tombstones"] == [("c-erased", 1.0, 1)]
        assert sorted(row[3] for row in stored["dead_letters"]) == ["c-bad", "c-big"]
        (metadata,) = [row[-1] for row in stored["conversations"] if row[0] == "c-a"]
        assert metadata == {"team": "a", "x": "1", "y": "2"}  # the second replica_joined is a duplicate
    finally:
        lite.close()
        pg.close()


def test_a_delivery_with_u0000_is_refused_alone_with_its_raw_body_kept(postgres_url: str) -> None:
    poisoned_body = encode(transcription_ready("c-nul", turns=2)).replace(b"You are", b"You\\u0000are", 1)
    assert b"\\u0000" in poisoned_body
    poisoned = tavus.parse(poisoned_body, {}, received_at=NOW)[0]
    assert unstorable(poisoned) is not None
    good = ready("c-ok", turns=3)
    with connect(postgres_url) as conn:
        first, second = pg_write_batch(conn, [poisoned, good])
        assert isinstance(first, StorageRejected)
        assert "U+0000" in str(first)
        assert second == WriteResult(received=4, inserted=4, updated=0)
        assert conn.execute("SELECT body, conversation_id, attempts FROM dead_letters").fetchall() == [
            (poisoned_body, "c-nul", 1)
        ]
        assert conn.execute("SELECT DISTINCT conversation_id FROM messages").fetchall() == [("c-ok",)]
        assert conn.execute("SELECT count(*) FROM conversations WHERE id = 'c-nul'").fetchone() == (0,)
        # Sent again: still refused, one dead letter with two attempts.
        (again,) = pg_write_batch(conn, [poisoned])
        assert isinstance(again, StorageRejected)
        assert conn.execute("SELECT attempts FROM dead_letters").fetchall() == [(2,)]


def test_a_nul_in_the_conversation_id_is_kept_escaped_in_dead_letters(postgres_url: str) -> None:
    delivery = replace(append("c-ok", [{"role": "user", "content": "hi"}]), conversation_id="c\x00id")
    with connect(postgres_url) as conn:
        (outcome,) = pg_write_batch(conn, [delivery])
        assert isinstance(outcome, StorageRejected)
        assert conn.execute("SELECT conversation_id FROM dead_letters").fetchall() == [("c\\x00id",)]


def test_nan_is_stored_as_null_and_none_as_null(postgres_url: str) -> None:
    delivery = ready("c-nan", turns=2)  # Tavus rows hold NULL as NaN (storage.deliveries.NULL)
    assert any(isinstance(v, float) and math.isnan(v) for v in delivery.rows[0])
    timeless = append("c-nan", [{"role": "user", "content": "no timestamp"}])
    with connect(postgres_url) as conn:
        pg_write_batch(conn, [delivery, timeless])
        nans = conn.execute(
            "SELECT count(*) FROM messages WHERE timestamp = 'NaN' OR seconds_from_start = 'NaN' OR duration = 'NaN'"
        ).fetchone()
        assert nans == (0,)
        system = conn.execute(
            "SELECT timestamp, seconds_from_start, duration, inference_id, vendor_role, external_id FROM messages"
            " WHERE source = 'tavus' AND seq = 0"
        ).fetchone()
        assert system == (None,) * 6
        assert conn.execute("SELECT timestamp FROM messages WHERE source = 'api'").fetchall() == [(None,)]
        started = conn.execute("SELECT started_at, recording_uri FROM conversations").fetchone()
        assert started == (None, None)


def run_together(*work: Callable[[], object]) -> list[Any]:
    """Run each callable in a thread of its own, started together; their results, or the first failure."""
    start = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work[i]()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


def test_the_same_delivery_written_by_two_connections_at_once_is_stored_once(postgres_url: str) -> None:
    with connect(postgres_url) as one, connect(postgres_url) as two:
        for i in range(20):
            body = encode(transcription_ready(f"c-{i % 3}", turns=30, seed=i))
            a = tavus.parse(body, {}, received_at=NOW)[0]
            b = tavus.parse(body, {}, received_at=NOW)[0]
            first, second = run_together(
                lambda a=a: pg_write_batch(one, [a]),  # type: ignore[misc]
                lambda b=b: pg_write_batch(two, [b]),  # type: ignore[misc]
            )
            outcomes = sorted([first[0], second[0]], key=lambda o: o.duplicate_delivery)
            assert outcomes[0].inserted + outcomes[0].updated > 0
            assert outcomes[1].duplicate_delivery
        assert one.execute("SELECT count(*) FROM events").fetchone() == (20,)


def test_interleaved_appends_from_two_writers_get_gapless_positions(postgres_url: str) -> None:
    def writer(name: str) -> None:
        with connect(postgres_url) as conn:
            for i in range(100):
                pair = [
                    append("c-shared", [{"role": "user", "content": f"{name}-{i}-a"}]),
                    append(
                        "c-shared", [{"role": "user", "content": f"{name}-{i}-b"}, {"role": "user", "content": "c"}]
                    ),
                ]
                outcomes = pg_write_batch(conn, pair)
                assert [o.inserted for o in outcomes if isinstance(o, WriteResult)] == [1, 2]

    run_together(lambda: writer("x"), lambda: writer("y"))
    with connect(postgres_url) as conn:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM messages ORDER BY seq").fetchall()]
        assert seqs == list(range(600))
        assert conn.execute("SELECT message_count FROM conversations").fetchall() == [(600,)]
        # Each writer's messages are in its own order.
        contents = [r[0] for r in conn.execute("SELECT content FROM messages WHERE content LIKE 'x-%-a' ORDER BY seq")]
        assert contents == [f"x-{i}-a" for i in range(100)]


def test_shuffled_overlapping_batches_from_two_writers_never_deadlock_and_lose_nothing(postgres_url: str) -> None:
    conversations = [f"c-{i:02}" for i in range(12)]

    def batches(seed: int) -> list[list[Record]]:
        rng = random.Random(seed)
        out = []
        for b in range(25):
            batch = []
            for cid in rng.sample(conversations, 8):
                batch.append(append(cid, [{"role": "user", "content": f"{seed}-{b}", "id": f"{seed}-{b}"}]))
                # The same transcript from both writers: stored once, whoever wins.
                batch.append(ready(cid, turns=4, seed=b % 5))
            rng.shuffle(batch)
            out.append(batch)
        return out

    def writer(seed: int) -> list[Outcome]:
        with connect(postgres_url) as conn:
            return [o for batch in batches(seed) for o in pg_write_batch(conn, batch)]

    outcomes = [o for part in run_together(lambda: writer(1), lambda: writer(2)) for o in part]
    assert not [o for o in outcomes if isinstance(o, StorageRejected)]
    with connect(postgres_url) as conn:
        appended = conn.execute("SELECT count(*) FROM messages WHERE source = 'api'").fetchone()
        assert appended == (2 * 25 * 8,)
        for cid in conversations:
            seqs = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM messages WHERE conversation_id = %s AND source = 'api' ORDER BY seq", (cid,)
                )
            ]
            assert seqs == list(range(len(seqs)))
        keys = {d.key for seed in (1, 2) for batch in batches(seed) for d in batch}
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (len(keys),)
        counted = conn.execute("SELECT sum(message_count) FROM conversations").fetchone()
        assert counted == conn.execute("SELECT count(*) FROM messages").fetchone()


def test_a_connection_lost_at_commit_raises_the_storage_error(postgres_url: str) -> None:
    with CommitCutter() as cutter:
        conn = connect(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{cutter.port}"))
        pg_write_batch(conn, [ready("c-before", turns=2)])  # through the relay, committed
        cutter.armed.set()
        with pytest.raises(StorageUnavailable, match="outcome is unknown"):
            pg_write_batch(conn, [ready("c-lost", turns=2)])
        assert cutter.cut.is_set()
        conn.close()
    with connect(postgres_url) as check:
        # The COMMIT never reached the server: it rolled the transaction back.
        ids = [row[0] for row in check.execute("SELECT conversation_id FROM events").fetchall()]
        assert ids == ["c-before"]


def test_a_connection_killed_before_the_batch_raises_the_storage_error(postgres_url: str) -> None:
    with connect(postgres_url) as admin:
        conn = connect(postgres_url)
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(StorageUnavailable, match="storage is unavailable"):
            pg_write_batch(conn, [ready("c-killed", turns=2)])
        assert admin.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_a_refusal_by_the_server_isolates_that_delivery(postgres_url: str) -> None:
    too_big = append("c-huge", [{"role": "user", "content": "seq out of range"}])
    # A position past bigint: psycopg sends it as numeric, and the server refuses it (22003).
    big = out_of_range("c-big")
    good = ready("c-good", turns=2)
    with connect(postgres_url) as conn:
        outcomes = pg_write_batch(conn, [good, big, too_big])
        assert isinstance(outcomes[1], StorageRejected)
        assert outcomes[0] == WriteResult(received=3, inserted=3, updated=0)
        assert outcomes[2] == WriteResult(received=1, inserted=1, updated=0)
        assert "bigint" in str(outcomes[1]) or "out of range" in str(outcomes[1])
        assert conn.execute("SELECT conversation_id FROM dead_letters").fetchall() == [("c-big",)]
        assert conn.execute("SELECT count(*) FROM conversations WHERE id = 'c-big'").fetchone() == (0,)


def test_sqlite_is_untouched_by_a_postgres_batch(tmp_path: Path) -> None:
    # The two write_batch functions share no state: the SQLite one still works on its own.
    lite = open_writer(tmp_path / "t.db")
    migrate(lite)
    try:
        (result,) = sqlite_write_batch(lite, [ready("c-x", turns=1)])
        assert result == WriteResult(received=2, inserted=2, updated=0)
        assert isinstance(lite, sqlite3.Connection)
    finally:
        lite.close()


def test_a_batch_chosen_as_a_deadlock_victim_is_retried_whole(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(postgres_url) as setup:
        pg_write_batch(setup, [ready("c-a", turns=1), ready("c-b", turns=1)])
    other = connect(postgres_url)
    writer = connect(postgres_url)
    # The writer gives up waiting first, so it is the victim (deadlock_timeout: when a waiter checks).
    writer.execute("SET deadlock_timeout = '100ms'")
    other.execute("SET deadlock_timeout = '10s'")
    try:
        other.execute("BEGIN")
        other.execute("UPDATE conversations SET rev = rev WHERE id = 'c-b'")
        batch = [append("c-a", [{"role": "user", "content": "x"}]), append("c-b", [{"role": "user", "content": "y"}])]
        outcomes: list[list[Outcome]] = []
        thread = threading.Thread(target=lambda: outcomes.append(pg_write_batch(writer, batch)))
        thread.start()
        # The writer holds c-a (locked first, in id order) and waits for c-b.
        deadline = time.monotonic() + 10
        while not other.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (writer.info.backend_pid,)
        ).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other.execute("UPDATE conversations SET rev = rev WHERE id = 'c-a'")  # the cycle: the writer is refused
        other.execute("COMMIT")
        thread.join(timeout=30)
        assert outcomes == [[WriteResult(1, 1, 0), WriteResult(1, 1, 0)]]
        assert "batch retried whole after DeadlockDetected" in caplog.text
        assert other.execute("SELECT count(*) FROM messages WHERE source = 'api'").fetchone() == (2,)
    finally:
        other.close()
        writer.close()
