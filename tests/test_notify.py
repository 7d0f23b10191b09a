"""Outbound webhooks, with the daemon in-process and a real receiver on loopback: what is sent, signed, in
what order, when it is tried again, given up and re-sent by the operator."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from storage.connection import open_writer
from storage.migrations import migrate
from tests.conftest import AppClient
from tests.daemon_process import transcriptd
from tests.payloads import encode, transcription_ready
from tests.receiver import SIGNING_SECRET, Answer, Received, Receiver, gaps, receiving

pytestmark = pytest.mark.anyio


def notify(receiver: Receiver, **settings: Any) -> dict[str, Any]:
    return {"notify.url": receiver.url, "notify.signing_secret": SIGNING_SECRET, **settings}


async def ingest(client: httpx.AsyncClient, conversation_id: str, turns: int) -> None:
    response = await client.post("/webhooks/tavus", content=encode(transcription_ready(conversation_id, turns=turns)))
    assert response.status_code == 200, response.text


def positions_by_conversation(received: list[Received]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = defaultdict(list)
    for r in received:
        by[r.body["data"]["conversation_id"]].append(r.body["data"]["position"])
    return by


async def test_every_change_is_delivered_signed_once_in_order(app_client: AppClient, db: Any) -> None:
    with receiving() as receiver:
        async with app_client(**notify(receiver)) as client:
            for turns in (2, 4, 6):  # each delivery adds messages: three changes per conversation
                for n in range(5):
                    await ingest(client, f"conv-{n}", turns)
            changes = db("SELECT position, conversation_id FROM changes ORDER BY position")
            assert len(changes) == 15
            await receiver.until(lambda r: len(r.delivered()) >= 15, 20, "every change delivered")
    delivered = receiver.delivered()
    assert all(r.verified for r in receiver.all())
    assert sorted(r.webhook_id for r in delivered) == sorted(f"chg_{p}" for p, _ in changes)
    expected: dict[str, list[int]] = defaultdict(list)
    for position, cid in changes:
        expected[cid].append(position)
    assert positions_by_conversation(delivered) == expected
    first = next(r.body for r in delivered if r.body["data"]["position"] == changes[0][0])
    assert first["type"] == "conversation.changed"
    data = first["data"]
    assert data["id"] == f"chg_{changes[0][0]}"
    assert data["conversation_id"] == "conv-0"
    assert data["source"] == "tavus"
    assert data["changes"]["messages_added"] == 3  # the system entry and two turns
    assert (data["first_seq"], data["last_seq"]) == (0, 2)
    assert data["url"] == "/conversations/conv-0"
    assert "messages" not in data


async def test_a_later_change_waits_until_the_earlier_one_is_delivered(app_client: AppClient, db: Any) -> None:
    with receiving() as receiver:
        receiver.script(Answer(500), Answer(500))  # the first change's first two attempts fail
        settings = notify(receiver, **{"notify.retry_schedule": [0.3]})
        async with app_client(**settings) as client:
            await ingest(client, "ordered", 2)
            await receiver.until(lambda r: len(r.all()) >= 1, 10, "the first attempt")
            await ingest(client, "ordered", 4)
            await ingest(client, "other", 2)
            await receiver.until(lambda r: len(r.delivered()) >= 3, 20, "three changes delivered")
    first, second = (p for (p,) in db("SELECT position FROM changes WHERE conversation_id = 'ordered' ORDER BY 1"))
    seen = [(r.body["data"]["position"], r.status) for r in receiver.all()]
    firsts = [status for position, status in seen if position == first]
    assert firsts[0] == 500  # the scripted failures go to whichever request comes: the first is this one
    assert firsts[-1] == 200
    # The conversation's second change was not sent before the first one was delivered (the other
    # conversation's change may come in between).
    assert [p for p, _ in seen].index(second) > seen.index((first, 200))


async def test_retry_schedule_and_retry_after_are_honoured(app_client: AppClient) -> None:
    with receiving() as receiver:
        receiver.script(Answer(500), Answer(502), Answer(429, retry_after="2"), Answer(503, retry_after="1"))
        settings = notify(receiver, **{"notify.retry_schedule": [0.4, 1.0]})
        async with app_client(**settings) as client:
            await ingest(client, "retried", 2)
            await receiver.until(lambda r: len(r.delivered()) >= 1, 30, "delivered after the retries")
    attempts = receiver.all()
    assert [r.status for r in attempts] == [500, 502, 429, 503, 200]
    assert len({r.webhook_id for r in attempts}) == 1  # the same id every time: the receiver dedupes by it
    assert all(r.verified for r in attempts)
    waited = gaps([r.at for r in attempts])
    # At least what the schedule and Retry-After ask (a little slack for clocks); never far more.
    assert waited[0] >= 0.35  # schedule[0]
    assert waited[1] >= 0.9  # schedule[1]
    assert waited[2] >= 1.9  # Retry-After: 2 wins over schedule[1] (1.0, repeating)
    assert waited[3] >= 0.9  # Retry-After: 1


async def test_an_attempt_that_gets_no_answer_in_time_is_tried_again(app_client: AppClient) -> None:
    with receiving() as receiver:
        receiver.script(Answer(200, delay_s=3.0))  # answers too late: counts as a failure
        settings = notify(receiver, **{"notify.timeout_s": 0.5, "notify.retry_schedule": [0.2]})
        async with app_client(**settings) as client:
            await ingest(client, "slow", 2)
            await receiver.until(lambda r: len(r.all()) >= 2, 20, "tried again after the timeout")
            readyz = (await client.get("/readyz")).json()
    assert readyz["status"] == "ready"
    assert all(r.webhook_id == receiver.all()[0].webhook_id for r in receiver.all())


async def test_include_messages_pushes_the_changed_messages(app_client: AppClient) -> None:
    with receiving() as receiver:
        async with app_client(**notify(receiver, **{"notify.include_messages": True})) as client:
            await ingest(client, "pushed", 2)
            await ingest(client, "pushed", 5)
            await receiver.until(lambda r: len(r.delivered()) >= 2, 20, "both changes delivered")
    first, second = (r.body["data"] for r in receiver.delivered())
    assert [m["seq"] for m in first["messages"]] == [0, 1, 2]
    assert (second["first_seq"], second["last_seq"]) == (3, 5)
    assert [m["seq"] for m in second["messages"]] == [3, 4, 5]
    assert all(m["content"] for m in second["messages"][1:])


async def test_a_failing_receiver_shows_in_readyz_and_metrics_without_making_it_unready(
    app_client: AppClient,
) -> None:
    with receiving(default=Answer(500)) as receiver:
        async with app_client(**notify(receiver, **{"notify.retry_schedule": [0.1]})) as client:
            await ingest(client, "failing", 2)
            await receiver.until(lambda r: len(r.all()) >= 4, 20, "several failed attempts")
            response = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    body = response.json()
    (state,) = body["notify"].values()
    assert state["pending"] == 1
    assert state["consecutive_failures"] >= 3
    assert state["last_error"] == "answered 500"
    assert any("has failed" in w for w in body["warnings"])
    assert receiver.url.split("//")[1] in next(iter(body["notify"]))
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("transcriptd_notify")
    }
    assert values["transcriptd_notify_pending"] == 1
    assert values["transcriptd_notify_retried_total"] >= 3
    assert values["transcriptd_notify_delivered_total"] == 0
    assert values["transcriptd_notify_oldest_pending_age_seconds"] > 0


async def test_given_up_after_max_age_then_listed_and_resent_by_the_operator(
    app_client: AppClient, target: str, tmp_path: Path
) -> None:
    with receiving(default=Answer(500)) as receiver:
        settings = notify(receiver, **{"notify.retry_schedule": [0.2], "notify.max_age_s": 1.0})
        async with app_client(**settings) as client:
            await ingest(client, "given-up", 2)
            await receiver.until(lambda r: len(r.all()) >= 2, 20, "attempts")
            metrics_text = ""

            def failed_listed(_: Receiver) -> bool:
                listed = transcriptd("notifications", "list", "--failed", "--json", "--db", target, cwd=tmp_path)
                return bool(json.loads(listed.stdout or "[]"))

            await receiver.until(failed_listed, 20, "the change marked failed")
            listed = transcriptd("notifications", "list", "--failed", "--db", target, cwd=tmp_path)
            assert listed.returncode == 0, listed.stderr
            assert "given-up" in listed.stdout
            assert "failed" in listed.stdout
            assert "answered 500" in listed.stdout
            attempts_before = len(receiver.all())
            metrics_text = (await client.get("/metrics")).text
            assert "transcriptd_notify_failed_total 1.0" in metrics_text
            # Given up: not tried again by itself.
            receiver.default = Answer(200)
            retried = transcriptd("notifications", "retry", "--all-failed", "--db", target, cwd=tmp_path)
            assert retried.returncode == 0, retried.stderr
            assert "1 to send again" in retried.stdout
            await receiver.until(lambda r: len(r.delivered()) == 1, 20, "re-sent after the operator's retry")
            assert len(receiver.all()) == attempts_before + 1
    listed = transcriptd("notifications", "list", "--db", target, cwd=tmp_path)
    assert listed.returncode == 0
    assert listed.stdout == "0 undelivered changes\n"


async def test_delivered_changes_leave_the_outbox_after_keep_days(app_client: AppClient, db: Any) -> None:
    with receiving() as receiver:
        async with app_client(**notify(receiver)) as client:
            await ingest(client, "kept", 2)
            await receiver.until(lambda r: len(r.delivered()) == 1, 20, "delivered")
        ((committed_at,),) = db("SELECT committed_at FROM changes")
        # Older than the retention below, whatever the machine's pace.
        await anyio.sleep(max(0.0, committed_at + 0.2 - time.time()))
        # keep_days of about 0.09 s: the first sweep, at start-up, prunes the delivered change.
        async with app_client(**notify(receiver, **{"notify.keep_days": 1e-6})):
            await receiver.until(lambda _: not db("SELECT * FROM changes"), 20, "the delivered change pruned")
        assert db("SELECT * FROM notifications") == []


async def test_an_erased_conversation_s_unsent_changes_are_dropped_and_its_erasure_sent(
    app_client: AppClient, db: Any
) -> None:
    def erasures_only(body: dict[str, Any]) -> Answer:
        return Answer(200) if body["type"] == "conversation.erased" else Answer(500)

    with receiving(chaos=erasures_only) as receiver:
        async with app_client(**notify(receiver, **{"notify.retry_schedule": [0.2]})) as client:
            await ingest(client, "erased", 2)
            await receiver.until(lambda r: len(r.all()) >= 1, 10, "the first change attempted")
            assert (await client.delete("/conversations/erased")).status_code == 200
            await receiver.until(lambda r: len(r.delivered()) == 1, 20, "the erasure delivered")
    (erasure,) = receiver.delivered()
    assert erasure.body["data"]["conversation_id"] == "erased"
    assert erasure.body["data"]["changes"] == {"erased": 1}
    assert all(r.body["type"] == "conversation.changed" for r in receiver.all() if r.status != 200)
    settled = db("SELECT last_error, delivered_at IS NOT NULL FROM notifications ORDER BY position")
    assert settled[0] == ("left the outbox before it was sent (conversation erased)", 1)
    assert settled[-1] == (None, 1)


def test_the_notifications_commands_say_when_there_is_nothing_to_do(db_path: Path, tmp_path: Path) -> None:
    missing = transcriptd("notifications", "list", "--db", str(db_path), cwd=tmp_path)
    assert missing.returncode == 1
    assert "no database" in missing.stderr
    with closing(open_writer(db_path)) as conn:
        migrate(conn)
    assert transcriptd("notifications", "list", "--db", str(db_path), cwd=tmp_path).stdout == "0 undelivered changes\n"
    unknown = transcriptd("notifications", "retry", "--change", "chg_99", "--db", str(db_path), cwd=tmp_path)
    assert unknown.returncode == 1
    assert "chg_99 is owed to no receiver" in unknown.stderr
    bad = transcriptd("notifications", "retry", "--change", "ninety", "--db", str(db_path), cwd=tmp_path)
    assert bad.returncode == 2
    assert "not a change id" in bad.stderr
    neither = transcriptd("notifications", "retry", "--db", str(db_path), cwd=tmp_path)
    assert neither.returncode == 2
