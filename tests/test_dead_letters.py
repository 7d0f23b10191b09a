"""Poison isolation with a dead-letter table, on a real database (SQLite file or PostgreSQL schema) that
genuinely refuses one delivery's rows (a trigger): the real app answers the others 200 and keeps the
refused one, raw body and error, in ``dead_letters``; ``transcriptd dead-letters list|retry`` (real
subprocesses) show it and, once the cause is gone, store it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import httpx
import pytest

from storage.backend import is_postgres_url
from tests.conftest import TEST_SECRETS, AppClient, Storage, execute
from tests.daemon_process import WEBHOOK, transcriptd
from tests.payloads import encode, transcription_ready
from tests.test_cli_help import help_text

POISON_TRIGGER = """
CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content = 'poison'
BEGIN SELECT RAISE(ABORT, 'poisoned row'); END
"""
# The same refusal on PostgreSQL: the server refuses the row mid-batch, as a constraint does (SQLite's
# RAISE(ABORT) is a constraint error too).
POSTGRES_POISON_TRIGGER = """
CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'poisoned row' USING ERRCODE = 'check_violation'; END $$;
CREATE TRIGGER poison BEFORE INSERT ON messages FOR EACH ROW WHEN (NEW.content = 'poison') EXECUTE FUNCTION poison();
"""


def poison(target: Path | str) -> None:
    """From now on the database refuses any message whose content is 'poison' (the schema must exist)."""
    execute(target, POSTGRES_POISON_TRIGGER if is_postgres_url(str(target)) else POISON_TRIGGER)


def cure(target: Path | str) -> None:
    postgres = is_postgres_url(str(target))
    execute(target, "DROP TRIGGER poison ON messages; DROP FUNCTION poison()" if postgres else "DROP TRIGGER poison")


TURNS = 4  # and the system entry: 5 messages per transcript


def poisoned_body(conversation_id: str) -> bytes:
    body = transcription_ready(conversation_id, turns=TURNS)
    body["properties"]["transcript"][2]["content"] = "poison"
    return encode(body)


@pytest.mark.anyio
async def test_a_refused_delivery_is_dead_lettered_then_retried(
    app_client: AppClient, storage: Storage, tmp_path: Path
) -> None:
    good = {f"c-good-{i}": encode(transcription_ready(f"c-good-{i}", turns=TURNS, seed=i)) for i in range(5)}
    poisoned = poisoned_body("c-poison")
    answers: dict[str, httpx.Response] = {}
    # Held open a while, so that the concurrent deliveries share one batch (and one transaction).
    async with app_client(**{"ingest.batch_max_delay_ms": 500}) as client:
        poison(storage.target)  # the schema exists once the app has started
        writer = client.app.state.runtime.writer  # type: ignore[attr-defined]
        commits_before = writer.commits

        async def post(cid: str, body: bytes) -> None:
            answers[cid] = await client.post(WEBHOOK, content=body)

        async with anyio.create_task_group() as tg:
            for cid, body in [*good.items(), ("c-poison", poisoned)]:
                tg.start_soon(post, cid, body)
        assert writer.commits == commits_before + 1  # one transaction: the refused delivery and the others

        for cid in good:
            assert answers[cid].status_code == 200, answers[cid].text
            assert answers[cid].json()["inserted"] == TURNS + 1
        refused = answers["c-poison"]
        assert refused.status_code >= 500
        assert refused.json()["error"]["code"] == "storage_rejected"
        assert refused.headers["retry-after"] == "60"

        (letter,) = storage.query("SELECT id, conversation_id, body, error, attempts, resolved_at FROM dead_letters")
        letter_id, cid, body, error, attempts, resolved_at = letter
        assert (cid, body, attempts, resolved_at) == ("c-poison", poisoned, 1, None)
        assert "poisoned row" in error
        # The others committed; of the refused one nothing but its dead letter is left.
        stored = storage.query("SELECT conversation_id, count(*) FROM messages GROUP BY conversation_id")
        assert dict(stored) == dict.fromkeys(good, TURNS + 1)
        assert storage.query("SELECT count(*) FROM events WHERE conversation_id = 'c-poison'") == [(0,)]

        # The sender retries: still refused, still one dead letter, one attempt more.
        again = await client.post(WEBHOOK, content=poisoned)
        assert again.status_code == refused.status_code
        assert again.headers["retry-after"] == "60"
        assert storage.query("SELECT id, attempts, resolved_at FROM dead_letters") == [(letter_id, 2, None)]

    db = storage.target
    listed = transcriptd("dead-letters", "list", "--db", db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"{letter_id}  " in listed.stdout
    assert "c-poison" in listed.stdout
    assert "attempts 2" in listed.stdout
    assert "poisoned row" in listed.stdout
    as_json = transcriptd("dead-letters", "list", "--json", "--db", db, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    (entry,) = json.loads(as_json.stdout)
    assert entry["id"] == letter_id
    assert entry["conversation_id"] == "c-poison"
    assert entry["event_type"] == "application.transcription_ready"
    assert entry["attempts"] == 2
    assert "poisoned row" in entry["error"]
    # Never the body: it holds the callback URL's token.
    assert "body" not in entry
    for output in (listed, as_json):
        assert not any(secret in output.stdout + output.stderr for secret in TEST_SECRETS)

    # The cause is still there: the retry fails, keeps the dead letter, and says so.
    failing = transcriptd("dead-letters", "retry", "--db", db, cwd=tmp_path)
    assert failing.returncode == 1
    assert "still fails" in failing.stderr
    assert "poisoned row" in failing.stderr
    assert storage.query("SELECT attempts, resolved_at FROM dead_letters") == [(3, None)]

    cure(storage.target)
    unknown = transcriptd("dead-letters", "retry", "--id", "999", "--db", db, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "no unresolved dead letter 999" in unknown.stderr
    retried = transcriptd("dead-letters", "retry", "--id", str(letter_id), "--db", db, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert f"dead letter {letter_id}" in retried.stdout
    assert f"stored, {TURNS + 1} messages inserted" in retried.stdout

    contents = storage.query("SELECT content FROM messages WHERE conversation_id = 'c-poison' ORDER BY seq")
    assert len(contents) == TURNS + 1
    assert ("poison",) in contents
    assert storage.query("SELECT body FROM events WHERE conversation_id = 'c-poison'") == [(poisoned,)]
    ((resolved,),) = storage.query("SELECT resolved_at FROM dead_letters")
    assert resolved is not None
    empty = transcriptd("dead-letters", "list", "--json", "--db", db, cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout) == []
    assert "0 unresolved dead letters" in transcriptd("dead-letters", "list", "--db", db, cwd=tmp_path).stdout

    # The sender's next retry is now a re-delivery of what is stored, and a new refusal would start afresh.
    async with app_client() as client:
        resent = await client.post(WEBHOOK, content=poisoned)
        assert resent.status_code == 200
        assert resent.json()["inserted"] == 0


@pytest.mark.parametrize(
    ("action", "options"), [("list", ["--json", "--config", "--db"]), ("retry", ["--id", "--config", "--db"])]
)
def test_dead_letters_actions_list_their_options(tmp_path: Path, action: str, options: list[str]) -> None:
    assert action in help_text(tmp_path, "dead-letters")
    text = help_text(tmp_path, "dead-letters", action)
    assert f"transcriptd dead-letters {action}" in text
    for option in options:
        assert option in text.partition("options:")[2]


def test_an_old_event_stored_late_does_not_make_a_live_conversation_old(db_path: Path) -> None:
    """A dead letter retried (or an event replayed) long after it was received must not move the
    conversation's last activity back, or retention would delete a conversation acknowledged yesterday."""
    from storage.connection import open_writer
    from storage.deliveries import Record
    from storage.migrations import migrate
    from storage.retention import prune_batch
    from storage.writes import write_batch

    day = 86_400.0
    now = time.time()
    conn = open_writer(db_path)
    migrate(conn)

    def delivery(key: str, received_at: float) -> Record:
        row = ("live", "test", 0 if key == "new" else 1, "user", key, None, None, None, None, None, received_at)
        return Record(
            key=key,
            source="test",
            event_type="t",
            conversation_id="live",
            received_at=received_at,
            body=b"{}",
            rows=[row],
        )

    write_batch(conn, [delivery("new", now - 1 * day)])
    write_batch(conn, [delivery("old", now - 40 * day)])  # stored late, e.g. by a dead-letter retry
    assert prune_batch(conn, now - 30 * day) == 0
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    conn.close()
