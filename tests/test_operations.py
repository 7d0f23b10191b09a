"""The operator commands as operators run them: real ``transcriptd`` subprocesses on real SQLite files,
beside a real daemon taking webhooks where the promise is about running alongside one.

The promises checked: ``replay`` re-derives exactly what intake stored, and a second replay changes
nothing; ``prune`` deletes exactly the old conversations (messages and events too) while intake goes on,
losing nothing acknowledged; ``backup`` taken under load holds everything acknowledged before it began;
``export`` writes a transcript's messages exactly and in order.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.sources import generic, tavus
from storage.backend import is_postgres_url
from storage.connection import open_writer
from storage.deliveries import Record
from storage.migrations import migrate
from storage.writes import write_batch
from tests.conftest import execute
from tests.daemon_process import (
    WEBHOOK,
    Daemon,
    Load,
    cli_argv,
    connect,
    daemon_env,
    managed,
    missing_rows,
    rows,
    start_daemon,
    transcriptd,
)
from tests.payloads import encode, envelope, transcript, transcription_ready

pytestmark = pytest.mark.slow

DAY = 86_400.0
FIXTURES = Path(__file__).parent / "fixtures"
Row = tuple[Any, ...]


def popen_transcriptd(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_argv(*args),
        cwd=cwd,
        env=daemon_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def table(path: Path | str, name: str, *, ignore: tuple[str, ...] = ()) -> list[Row]:
    """Every row of a table, in key order, without the ``ignore`` columns (a SQLite file or a PostgreSQL URL)."""
    order = {"conversations": "id", "messages": "conversation_id, source, seq", "events": "id"}[name]
    if is_postgres_url(str(path)):
        found = rows(
            path,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (name,),
        )
        # rev counts the writes to a conversation (for the replicas' caches): bookkeeping, not data to compare.
        columns = [c[0] for c in found if c[0] not in (*ignore, "rev")]
    else:
        columns = [c[1] for c in rows(path, f"PRAGMA table_info({name})") if c[1] not in ignore]
    return rows(path, f"SELECT {', '.join(columns)} FROM {name} ORDER BY {order}")  # noqa: S608


def copy_database(source: Path, target: Path) -> None:
    with connect(source) as src, connect(target) as dst:
        src.backup(dst)


class Poster:
    """Posts to a daemon and checks each answer's status."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = httpx.Client(base_url=daemon.base_url, timeout=15.0, trust_env=False)

    def tavus(self, body: dict[str, Any], expect: int = 200) -> None:
        self._check(self.client.post(WEBHOOK, content=encode(body)), expect)

    def vapi(self, body: dict[str, Any], expect: int = 200) -> None:
        self._check(self.client.post("/webhooks/vapi", content=json.dumps(body)), expect)

    def messages(self, cid: str, body: Any, expect: int = 200, headers: dict[str, str] | None = None) -> None:
        response = self.client.post(f"/conversations/{cid}/messages", content=json.dumps(body), headers=headers)
        self._check(response, expect)

    @staticmethod
    def _check(response: httpx.Response, expect: int) -> None:
        assert response.status_code == expect, response.text

    def close(self) -> None:
        self.client.close()


# --- replay ---------------------------------------------------------------------------------------------


def post_everything(daemon: Daemon) -> None:
    """Every kind of delivery: each Tavus event type, re-sent transcripts, both streams, client ids."""
    post = Poster(daemon)
    try:
        for n in range(4):
            cid = f"rp-t{n}"
            post.tavus(envelope(cid, "system.replica_joined", {"replica_id": "r1"}))
            post.tavus(envelope(cid, "system.pal_joined", {"replica_id": "r1"}))  # the same join: one event
            post.tavus(transcription_ready(cid, turns=6 + n, seed=n, timestamps="iso" if n % 2 else "epoch"))
            post.tavus(envelope(cid, "system.shutdown", {"replica_id": "r1", "shutdown_reason": "end_call"}))
        # A re-sent transcript whose entries changed (a different body: a new delivery) updates in place.
        post.tavus(transcription_ready("rp-t1", turns=9, seed=99))
        post.tavus(
            envelope("rp-t0", "application.recording_ready", {"storage_provider": "gcs", "storage_uri": "gs://b/k.mp4"})
        )
        post.tavus(envelope("rp-t1", "application.recording_ready", {"bucket_name": "b", "s3_key": "k.mp4"}))
        post.tavus(envelope("rp-t2", "application.perception_analysis", {"analysis": "calm"}))
        post.tavus(envelope("rp-t3", "application.perception_unavailable", {"reason": "no video"}))
        post.tavus(envelope("rp-t3", "application.recording_copy_failed", {"error_message": "denied"}))
        post.tavus(envelope("rp-t2", "application.post_call_action_executed", {"tool_name": "crm", "status": "ok"}))
        post.tavus(envelope("rp-t2", "application.something_new", {"x": 1}))
        # A transcript with a bad entry: 422, but the good entries are stored.
        bad = transcript(4, seed=7)
        bad[2] = {"content": "no role"}
        post.tavus(envelope("rp-bad", "application.transcription_ready", {"transcript": bad}), expect=422)

        # The generic stream: appended, with and without client ids, next to a Tavus transcript.
        post.messages("rp-g1", [{"role": "user", "content": f"plain {i}"} for i in range(3)])
        post.messages("rp-g1", {"role": "user", "content": "first m1", "id": "m1", "timestamp": 1740824130.5})
        post.messages(
            "rp-g1",
            [
                {"role": "assistant", "content": "m2", "id": "m2", "timestamp": "2025-03-01T10:15:31Z"},
                {"role": "user", "content": "no id"},
                {"role": "user", "content": "m3", "id": "m3"},
            ],
        )
        post.messages("rp-g1", {"role": "user", "content": "m1 edited", "id": "m1"})  # an update, timestamp kept
        post.messages("rp-g1", [{"role": "user", "content": "plain 0"}])  # a body seen before: a retry
        post.messages("rp-g1", [{"role": "user", "content": "plain 0"}])
        same = {"role": "user", "content": "said twice"}
        post.messages("rp-g1", same, headers={"Idempotency-Key": "k1"})
        post.messages("rp-g1", same, headers={"Idempotency-Key": "k2"})  # two deliveries: two messages
        post.messages(
            "rp-g1",
            [{"role": "user", "content": "kept", "id": "m4"}, {"role": 5}, {"role": "user", "content": "m1 again"}],
            expect=422,
        )
        post.messages(
            "rp-g1", [{"role": "user", "content": "x", "id": "m5"}, {"role": "user", "content": "y", "id": "m5"}]
        )
        post.messages("rp-t0", [{"role": "user", "content": "live utterance", "id": "u1"}])
        post.tavus(envelope("rp-g1", "system.shutdown", {"shutdown_reason": "done"}))

        # Vapi: snapshots as the call goes, the end-of-call report (one entry bad: 422), a status, a raw type.
        report = json.loads((FIXTURES / "vapi" / "schema-end-of-call-report-with-tools.json").read_bytes())
        turns = report["message"]["artifact"]["messages"]
        call = report["message"]["call"]
        for stamp, count in ((1, 2), (2, 4)):
            post.vapi(
                {
                    "message": {
                        "type": "conversation-update",
                        "timestamp": stamp,
                        "call": call,
                        "messages": turns[:count],
                    }
                }
            )
        turns.append({"role": "narrator", "message": "not a Vapi role"})
        post.vapi(report, expect=422)
        post.vapi({"message": {"type": "status-update", "status": "ended", "timestamp": 9, "call": call}})
        post.vapi({"message": {"type": "hang", "call": {"id": "rp-v2"}}})
    finally:
        post.close()


def test_replay_rederives_conversations_and_messages_exactly_and_twice_changes_nothing(
    tmp_path: Path, target: str
) -> None:
    with managed(start_daemon(tmp_path, target)) as daemon:
        post_everything(daemon)
        assert daemon.stop(signal.SIGTERM) == 0

    loose = ("id", "created_at", "updated_at")
    original = {name: table(target, name, ignore=loose) for name in ("messages", "conversations")}
    conversations = table(target, "conversations")
    messages = table(target, "messages", ignore=("id",))
    inserted = rows(target, "SELECT count(*) FROM messages")[0][0]
    execute(target, "DELETE FROM messages; DELETE FROM conversations")
    events = rows(target, "SELECT count(*) FROM events")[0][0]
    assert rows(target, "SELECT count(*) FROM messages") == [(0,)]

    done = transcriptd("replay", "--db", target, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"replayed {events} events" in done.stdout, done.stdout
    assert f"{inserted} messages inserted" in done.stdout, done.stdout

    for name in ("messages", "conversations"):
        assert table(target, name, ignore=loose) == original[name], name
    # Stricter than asked, and what retention relies on: replay keeps each conversation's times (a
    # replayed old conversation stays old), and each message's created_at is its first delivery's.
    assert table(target, "conversations") == conversations
    assert table(target, "messages", ignore=("id",)) == messages

    before = {name: table(target, name) for name in ("messages", "conversations", "events")}
    again = transcriptd("replay", "--db", target, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"replayed {events} events" in again.stdout, again.stdout
    assert "0 messages inserted" in again.stdout, again.stdout
    assert {name: table(target, name) for name in before} == before


def test_replay_of_one_conversation_or_since_a_time_restores_appended_messages_in_place(
    tmp_path: Path, target: str
) -> None:
    with managed(start_daemon(tmp_path, target)) as daemon:
        post_everything(daemon)
        assert daemon.stop(signal.SIGTERM) == 0
    original = table(target, "messages", ignore=("id",))
    conversations = table(target, "conversations")
    api_events = rows(target, "SELECT received_at FROM events WHERE conversation_id = 'rp-g1' AND source = 'api'")
    since = api_events[4][0]  # from the fifth delivery on: the positions before it must be re-read

    # ISO-8601 to the microsecond: a hair earlier, so that rounding cannot leave that delivery out.
    iso = datetime.fromtimestamp(since - 0.001, UTC).isoformat()
    for args, where in [
        (["--conversation", "rp-g1"], "conversation_id = 'rp-g1'"),
        (["--since", repr(since)], f"conversation_id = 'rp-g1' AND created_at >= {since!r}"),
        (["--since", iso], f"created_at >= {since!r}"),
    ]:
        # As if those messages had never been stored: the rows and their count.
        lost = rows(target, f"SELECT conversation_id, count(*) FROM messages WHERE {where} GROUP BY 1")  # noqa: S608
        assert lost
        # The test's own ids and counts, spliced into one script.
        update = "UPDATE conversations SET message_count = message_count - {} WHERE id = '{}';"
        recount = "".join(update.format(n, cid) for cid, n in lost)
        execute(target, recount + f"DELETE FROM messages WHERE {where}")  # noqa: S608
        done = transcriptd("replay", "--db", target, *args, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert table(target, "messages", ignore=("id",)) == original, args
        assert table(target, "conversations") == conversations, args
        # Again, on a database that has it all: appended messages are not appended a second time.
        again = transcriptd("replay", "--db", target, *args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "0 messages inserted" in again.stdout, again.stdout
        assert table(target, "messages", ignore=("id",)) == original, args
        assert table(target, "conversations") == conversations, args

    unknown = transcriptd("replay", "--db", str(tmp_path / "nowhere.db"), cwd=tmp_path)
    assert unknown.returncode == 1
    assert "no database" in unknown.stderr
    assert not (tmp_path / "nowhere.db").exists()


# --- prune ----------------------------------------------------------------------------------------------


def seed(db_path: Path | str, deliveries: list[Record]) -> None:
    """Store deliveries with the writer's own code, with whatever received_at they carry."""
    if is_postgres_url(str(db_path)):
        from storage.postgres.connection import connect as connect_postgres
        from storage.postgres.writes import write_batch as write_postgres

        with connect_postgres(str(db_path)) as pg:  # a schema of the tests comes migrated
            for start in range(0, len(deliveries), 100):
                outcomes = write_postgres(pg, deliveries[start : start + 100])
                assert all(not isinstance(o, Exception) for o in outcomes), outcomes
        return
    conn = open_writer(db_path)
    try:
        migrate(conn)
        for start in range(0, len(deliveries), 100):
            outcomes = write_batch(conn, deliveries[start : start + 100])
            assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    finally:
        conn.close()


def conversation_deliveries(cid: str, at: float, *, generic_stream: bool) -> list[Record]:
    """A transcript and a shutdown (Tavus), or two posts of messages (generic), received at ``at``."""
    if generic_stream:
        bodies = [
            b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]',
            b'{"role": "user", "content": "bye", "id": "x"}',
        ]
        return [generic.parse(body, {}, received_at=at + i, conversation_id=cid)[0] for i, body in enumerate(bodies)]
    return [
        tavus.parse(encode(transcription_ready(cid, turns=4)), {}, received_at=at)[0],
        tavus.parse(encode(envelope(cid, "system.shutdown", {"shutdown_reason": "end"})), {}, received_at=at + 1)[0],
    ]


def seed_old_and_fresh(db_path: Path | str, *, old: int, fresh: int) -> tuple[list[str], list[str]]:
    """``old`` conversations last updated 100+ days ago; ``fresh`` ones updated 1 to 29 days ago."""
    now = time.time()
    old_ids = [f"old-{n:04d}" for n in range(old)]
    fresh_ids = [f"kept-{n:03d}" for n in range(fresh)]
    deliveries: list[Record] = []
    for n, cid in enumerate(old_ids):
        deliveries += conversation_deliveries(cid, now - 100 * DAY - n * 60, generic_stream=n % 5 == 0)
    for n, cid in enumerate(fresh_ids):
        days = 29 if n == 0 else 1  # the first is just inside the 30 days
        deliveries += conversation_deliveries(cid, now - days * DAY - n * 60, generic_stream=n % 2 == 0)
    seed(db_path, deliveries)
    return old_ids, fresh_ids


def of_conversations(db_path: Path | str, ids: list[str]) -> dict[str, list[Row]]:
    marks = ", ".join("?" * len(ids))
    return {
        "conversations": rows(db_path, f"SELECT * FROM conversations WHERE id IN ({marks}) ORDER BY id", (*ids,)),  # noqa: S608
        "messages": rows(db_path, f"SELECT * FROM messages WHERE conversation_id IN ({marks}) ORDER BY id", (*ids,)),  # noqa: S608
        "events": rows(db_path, f"SELECT * FROM events WHERE conversation_id IN ({marks}) ORDER BY id", (*ids,)),  # noqa: S608
    }


def counts(text: str, verb: str) -> tuple[int, int, int]:
    match = re.search(rf"{verb} (\d+) conversations, (\d+) messages, (\d+) events", text)
    assert match, text
    return int(match[1]), int(match[2]), int(match[3])


def test_prune_dry_run_counts_and_deletes_nothing(tmp_path: Path, target: str) -> None:
    db_path = target
    old_ids, _ = seed_old_and_fresh(db_path, old=60, fresh=5)
    everything = {name: table(db_path, name) for name in ("conversations", "messages", "events")}
    old = of_conversations(db_path, old_ids)

    done = transcriptd("prune", "--dry-run", "--older-than-days", "30", "--db", db_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert counts(done.stdout, "would delete") == (60, len(old["messages"]), len(old["events"]))
    assert "nothing deleted" in done.stdout

    # No --older-than-days and no storage.retention_days configured: keep everything.
    unset = transcriptd("prune", "--db", db_path, cwd=tmp_path)
    assert unset.returncode == 0, unset.stderr
    assert "no retention configured" in unset.stdout
    assert {name: table(db_path, name) for name in everything} == everything
    # A mistyped path is named even when nothing would be deleted, so a cron job does not pass silently.
    mistyped = transcriptd("prune", "--db", str(tmp_path / "transcripd.db"), cwd=tmp_path)
    assert mistyped.returncode == 1, mistyped.stdout
    assert "no database at" in mistyped.stderr

    # storage.retention_days from the config file, as the daemon reads it.
    config = tmp_path / "retention.toml"
    config.write_text("[storage]\nretention_days = 30\n")
    configured = transcriptd("prune", "--dry-run", "--config", str(config), "--db", db_path, cwd=tmp_path)
    assert configured.returncode == 0, configured.stderr
    assert counts(configured.stdout, "would delete") == (60, len(old["messages"]), len(old["events"]))

    refused = transcriptd("prune", "--older-than-days", "0", "--db", db_path, cwd=tmp_path)
    assert refused.returncode == 2
    assert "--older-than-days" in refused.stderr
    assert {name: table(db_path, name) for name in everything} == everything


def test_prune_under_concurrent_intake_deletes_exactly_the_old_and_loses_nothing_acknowledged(
    tmp_path: Path, target: str
) -> None:
    db_path = target
    old_ids, fresh_ids = seed_old_and_fresh(db_path, old=300, fresh=12)
    fresh_before = of_conversations(db_path, fresh_ids)
    revived = old_ids[1:300:60]  # old conversations that get a new message while the prune runs
    rest_old = [cid for cid in old_ids if cid not in revived]

    with managed(start_daemon(tmp_path, db_path)) as daemon:
        load = Load(daemon.base_url, "new", senders=3, turns=5, max_deliveries=3000, duration_s=25.0).start()
        try:
            load.wait_answered(200, 30, timeout=15.0)
            prune = popen_transcriptd("prune", "--older-than-days", "30", "--db", db_path, cwd=tmp_path)
            post = Poster(daemon)
            try:
                for cid in revived:
                    post.messages(cid, {"role": "user", "content": f"back again {cid}", "id": "revived"})
            finally:
                post.close()
            stdout, stderr = prune.communicate(timeout=60)
            during = len(load.answered(200))
            load.wait_answered(200, during + 20, timeout=15.0)  # intake goes on after the prune too
        finally:
            load.stop()
        outcomes = load.join(timeout=20.0)
        assert daemon.stop(signal.SIGTERM) == 0

    assert prune.returncode == 0, stdout + stderr
    acknowledged = [o.conversation_id for o in outcomes if o.status == 200]
    assert {o.status for o in outcomes} == {200}, load.summary()
    assert not missing_rows(db_path, acknowledged, load.rows_per_delivery)

    gone = of_conversations(db_path, rest_old)
    assert gone == {"conversations": [], "messages": [], "events": []}
    assert of_conversations(db_path, fresh_ids) == fresh_before

    # A conversation revived during the prune was either deleted first (only the new message is left)
    # or refreshed first (all of it is kept): never a part of it.
    kept_revived = 0
    for cid in revived:
        messages = rows(db_path, "SELECT source, content FROM messages WHERE conversation_id = ?", (cid,))
        assert ("api", f"back again {cid}") in messages, cid
        if len(messages) > 1:
            kept_revived += 1
            assert len(messages) == 1 + 5, messages  # the 4-turn transcript with its system entry, and the new one
    deleted = counts(stdout, "deleted")
    assert deleted[0] == len(old_ids) - kept_revived, stdout


# --- backup ---------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only("SQLite's online backup API; a PostgreSQL database is backed up with pg_dump")
def test_backup_under_load_holds_every_delivery_acknowledged_before_it_began(tmp_path: Path) -> None:
    db_path = tmp_path / "transcriptd.db"
    target = tmp_path / "backups" / "snapshot.db"
    target.parent.mkdir()
    with managed(start_daemon(tmp_path, db_path)) as daemon:
        load = Load(daemon.base_url, "bk", senders=4, turns=20, max_deliveries=3000, duration_s=25.0).start()
        try:
            load.wait_answered(200, 100, timeout=15.0)
            acknowledged = load.answered(200)
            # Small steps: many of them while the daemon commits, which must not restart the copy forever.
            done = transcriptd("backup", str(target), "--step-pages", "4", "--db", str(db_path), cwd=tmp_path)
            after = len(load.answered(200))
            load.wait_answered(200, after + 10, timeout=15.0)  # the daemon went on meanwhile
        finally:
            load.stop()
        load.join(timeout=20.0)
        assert daemon.stop(signal.SIGTERM) == 0

    assert done.returncode == 0, done.stdout + done.stderr
    with connect(target) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        conversations, messages, events = (
            conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # noqa: S608
            for name in ("conversations", "messages", "events")
        )
    assert not missing_rows(target, acknowledged, load.rows_per_delivery)
    assert len(acknowledged) >= 100
    assert f"{conversations} conversations, {messages} messages, {events} events" in done.stdout, done.stdout
    assert sorted(p.name for p in target.parent.iterdir()) == ["snapshot.db"]  # one file, no partial left
    assert target.stat().st_mode & 0o777 == 0o600  # as private as the database: it holds the same secrets

    stored = target.read_bytes()
    refused = transcriptd("backup", str(target), "--db", str(db_path), cwd=tmp_path)
    assert refused.returncode == 1
    assert "already exists" in refused.stderr
    assert target.read_bytes() == stored

    forced = transcriptd("backup", str(target), "--force", "--db", str(db_path), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert not missing_rows(target, load.answered(200), load.rows_per_delivery)  # the daemon had stopped


# --- export ---------------------------------------------------------------------------------------------


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_export_writes_the_transcript_exactly_in_order(tmp_path: Path, target: str) -> None:
    db_path = target
    entries = [
        {"role": "system", "content": "You are Ana."},
        {"role": "user", "content": "Hello, olá 😀", "timestamp": "2025-03-01T12:01:05Z"},
        {"role": "assistant", "content": "Hi! How can I help?", "timestamp": at("2025-03-01T12:01:10.500+00:00")},
        {"role": "user", "content": "line one\nline two"},
    ]
    with managed(start_daemon(tmp_path, db_path)) as daemon:
        post = Poster(daemon)
        try:
            post.tavus(envelope("ex-1", "application.transcription_ready", {"transcript": entries}))
            post.messages("ex-1", {"role": "user", "content": "typed first", "timestamp": "2025-03-01T12:00:00Z"})
        finally:
            post.close()

        # While the daemon serves: export only reads.
        jsonl = transcriptd("export", "--conversation", "ex-1", "--format", "jsonl", "--db", db_path, cwd=tmp_path)
        output = tmp_path / "ex-1.md"
        markdown = transcriptd(
            "export",
            "--conversation",
            "ex-1",
            "--format",
            "markdown",
            "--output",
            str(output),
            "--db",
            str(db_path),
            cwd=tmp_path,
        )
        unknown = transcriptd("export", "--conversation", "nope", "--db", db_path, cwd=tmp_path)
        assert daemon.stop(signal.SIGTERM) == 0

    assert jsonl.returncode == 0, jsonl.stderr
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    expected = [
        ("api", 0, "user", "typed first", at("2025-03-01T12:00:00+00:00"), False),
        ("tavus", 0, "system", "You are Ana.", None, True),
        ("tavus", 1, "user", "Hello, olá 😀", at("2025-03-01T12:01:05+00:00"), False),
        ("tavus", 2, "assistant", "Hi! How can I help?", at("2025-03-01T12:01:10.5+00:00"), False),
        ("tavus", 3, "user", "line one\nline two", None, False),
    ]
    assert [(m["source"], m["seq"], m["role"], m["content"], m["timestamp"], m["system"]) for m in lines] == expected
    assert {m["conversation_id"] for m in lines} == {"ex-1"}

    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout == ""
    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Conversation ex-1\n")
    assert "- status: ended\n" in text
    assert "- messages: 5\n" in text
    body = [line for line in text.splitlines() if line.startswith(("**", "## "))]
    assert body == [
        "## api messages",
        "**user** (12:00:00): typed first",
        "## tavus messages",
        "**system** [system]: You are Ana.",
        "**user** (12:01:05): Hello, olá 😀",
        "**assistant** (12:01:10): Hi! How can I help?",
        "**user**: line one<br>line two",
    ]

    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert "no conversation 'nope'" in unknown.stderr
