"""Outbound webhooks end to end: the daemon as a real process, killed with SIGKILL while changes are owed,
and a real receiver on loopback that is down for a while and flaky after. Nothing committed goes unsent."""

from __future__ import annotations

import random
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import Load, managed, rows, start_daemon
from tests.receiver import SIGNING_SECRET, Answer, Receiver

pytestmark = pytest.mark.slow

UNDELIVERED = "SELECT count(*) FROM notifications WHERE delivered_at IS NULL"
CONVERSATIONS = 500  # each gets two transcripts: 1,000 ingested, two changes per conversation


def notify_env(receiver: Receiver) -> dict[str, str]:
    return {
        "TRANSCRIPTD_NOTIFY_URL": receiver.url,
        "TRANSCRIPTD_NOTIFY_SIGNING_SECRET": SIGNING_SECRET,
        "TRANSCRIPTD_NOTIFY_RETRY_SCHEDULE": "0.2 0.5",
        "TRANSCRIPTD_NOTIFY_TIMEOUT_S": "1",
        "TRANSCRIPTD_NOTIFY_MAX_PARALLEL": "16",
    }


def flaky(seed: int) -> Receiver:
    """A receiver that, once up, fails about a fifth of the requests: 500s, 429s with Retry-After, and
    answers too late for notify.timeout_s."""
    chance = random.Random(seed)
    lock = threading.Lock()

    def answer(body: dict[str, Any]) -> Answer:
        with lock:
            roll = chance.random()
        if roll < 0.12:
            return Answer(500)
        if roll < 0.17:
            return Answer(429, retry_after="1")
        if roll < 0.19:
            return Answer(200, delay_s=1.5)  # past the timeout: the sender gives up on it and tries again
        return Answer(200)

    return Receiver(chaos=answer)


def ingest(base_url: str, turns: int) -> None:
    load = Load(base_url, prefix="conv", senders=8, turns=turns, max_deliveries=CONVERSATIONS, duration_s=45)
    outcomes = load.start().join(60)
    assert [o for o in outcomes if o.status != 200] == []
    assert len(outcomes) == CONVERSATIONS


def test_a_thousand_transcripts_reach_a_receiver_down_then_flaky_across_kill_9(tmp_path: Path, target: str) -> None:
    db_path = target
    receiver = flaky(seed=16)
    receiver.up()  # for its port, then down: every attempt meets a refused connection
    receiver.down()
    try:
        env = notify_env(receiver)
        with managed(start_daemon(tmp_path, db_path, env=env, name="first")) as first:
            ingest(first.base_url, turns=3)
            first.kill()  # SIGKILL with 500 changes committed and none delivered
        with managed(start_daemon(tmp_path, db_path, env=env, name="second")) as second:
            # The same conversations again, longer: each gets a second change, committed after the first.
            ingest(second.base_url, turns=6)
            receiver.up()
            receiver.wait_for(lambda r: len(r.delivered()) >= 300, 60, "a first part delivered")
            second.send(signal.SIGKILL)  # mid-delivery: attempts in flight, outcomes not yet recorded
            second.wait_exit()
        changes = rows(db_path, "SELECT position, conversation_id FROM changes ORDER BY position")
        assert len(changes) == 2 * CONVERSATIONS
        expected = {f"chg_{position}" for position, _ in changes}
        with managed(start_daemon(tmp_path, db_path, env=env, name="third")) as third:
            receiver.wait_for(lambda r: expected <= {x.webhook_id for x in r.delivered()}, 60, "every change delivered")
            # Some were answered 2xx just before the SIGKILL, not recorded: they are sent again, then settled.
            receiver.wait_for(lambda _: rows(db_path, UNDELIVERED) == [(0,)], 60, "every delivery recorded")
            assert third.stop() == 0
    finally:
        receiver.down()

    received = receiver.all()
    assert all(r.verified for r in received), "a notification's signature does not verify"
    assert all(r.webhook_id == f"chg_{r.body['data']['position']}" for r in received)
    # In order per conversation: no request for a change before the conversation's earlier change was
    # answered 2xx; after a SIGKILL an earlier one may come again, never a later one before it.
    position_of = dict(changes)
    delivered_upto: dict[str, int] = defaultdict(int)
    for r in received:
        position = r.body["data"]["position"]
        cid = position_of[position]
        earlier = [p for p, c in changes if c == cid and p < position]
        assert all(p <= delivered_upto[cid] for p in earlier), f"chg_{position} of {cid} sent before an earlier one"
        if 200 <= r.status < 300:
            delivered_upto[cid] = max(delivered_upto[cid], position)
    statuses = {r.status for r in received}
    assert {500, 429} <= statuses, "the receiver was not flaky: the test shows nothing"
