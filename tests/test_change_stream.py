"""The change feed against real daemons: the SSE stream resuming after ``Last-Event-ID`` and ending
cleanly on SIGTERM, a follower of ``next`` under concurrent ingest, and kill -9 under load (every
acknowledged delivery has its change after the restart, and no change outlives its data)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.daemon_process import WEBHOOK, Load, managed, rows, start_daemon
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.slow

TURNS = 5


def post(client: httpx.Client, cid: str) -> None:
    response = client.post(WEBHOOK, content=encode(transcription_ready(cid, turns=TURNS)))
    assert response.status_code == 200, response.text


def sse_items(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Each event of the stream as a dict of its fields, and each comment as {"comment": text}."""
    event: dict[str, Any] = {}
    for line in lines:
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line == "":
            if event:
                yield event
            event = {}
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def test_the_stream_resumes_after_last_event_id_follows_commits_and_ends_on_sigterm(
    tmp_path: Path, target: str
) -> None:
    env = {
        # A stream holding the shutdown up would keep the daemon past EXIT_TIMEOUT_S (40 s for the requests).
        "TRANSCRIPTD_SERVER_SHUTDOWN_TIMEOUT_S": "100",
        "TRANSCRIPTD_CHANGES_HEARTBEAT_S": "0.2",
    }
    with managed(start_daemon(tmp_path, target, env=env)) as daemon:
        with httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=30) as client:
            for n in range(3):
                post(client, f"sse-{n}")
            seen: list[dict[str, Any]] = []
            comments: list[str] = []
            ended_cleanly = False
            # With its trailing slash: served, not redirected (no route redirects).
            with client.stream("GET", "/changes/stream/", headers={"Last-Event-ID": "1"}) as stream:
                assert stream.status_code == 200
                assert "location" not in stream.headers
                assert stream.headers["content-type"].startswith("text/event-stream")
                posted_live = stopped = False
                for item in sse_items(stream.iter_lines()):
                    if "comment" in item:
                        comments.append(item["comment"])
                    elif "data" in item:
                        seen.append(item)
                    if len(seen) == 2 and not posted_live:
                        with httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=30) as other:
                            post(other, "sse-live")
                        posted_live = True
                    if len(seen) == 3 and "heartbeat" in comments and not stopped:
                        daemon.send(signal.SIGTERM)
                        stopped = True
                ended_cleanly = True  # the server ended the body: no exception from a cut connection
            assert ended_cleanly
        assert daemon.wait_exit() == 0, daemon.log_tail()
    assert [(e["id"], e["event"]) for e in seen] == [("2", "change"), ("3", "change"), ("4", "change")]
    changes = [msgspec.json.decode(e["data"]) for e in seen]
    assert [c["conversation_id"] for c in changes] == ["sse-1", "sse-2", "sse-live"]
    assert [c["id"] for c in changes] == ["chg_2", "chg_3", "chg_4"]
    assert "timeout graceful shutdown exceeded" not in daemon.log()


def test_a_follower_of_next_sees_every_change_once_in_order_under_concurrent_ingest(
    tmp_path: Path, target: str
) -> None:
    db_path = target
    with managed(start_daemon(tmp_path, db_path)) as daemon:
        load = Load(daemon.base_url, "fol", senders=8, turns=TURNS, max_deliveries=400, duration_s=60.0).start()
        positions: list[int] = []
        conversations: list[str] = []
        after = 0
        idle = 0
        with httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=30) as client:
            # Until every delivery's change came, or nothing came for six long-polls in a row (a lost one).
            while len(conversations) < 400 and idle < 6:
                response = client.get("/changes", params={"after": after, "limit": 37, "wait": 5})
                assert response.status_code == 200, response.text
                page = response.json()
                positions += [c["position"] for c in page["changes"]]
                conversations += [c["conversation_id"] for c in page["changes"]]
                assert page["next"] == (page["changes"][-1]["position"] if page["changes"] else after)
                after = page["next"]
                idle = 0 if page["changes"] else idle + 1
            outcomes = load.join()
            assert client.get("/changes", params={"after": after}).json() == {"changes": [], "next": after}
    acknowledged = [o.conversation_id for o in outcomes if o.status == 200]
    assert len(acknowledged) == 400, load.summary()
    assert positions == sorted(set(positions)), "out of order, or seen twice"
    assert sorted(conversations) == sorted(acknowledged), "each acknowledged transcript is one change, seen once"
    assert positions == [p for (p,) in rows(db_path, "SELECT position FROM changes ORDER BY position")]


def test_kill_9_under_load_every_acknowledged_delivery_has_its_change(tmp_path: Path, target: str) -> None:
    rng = random.Random(16)
    db_path = target
    acknowledged: list[str] = []
    for round_ in range(4):
        with managed(start_daemon(tmp_path, db_path, name=f"round-{round_}")) as daemon:
            load = Load(daemon.base_url, f"k{round_}", senders=4, turns=TURNS, max_deliveries=3000, duration_s=5.0)
            load.start()
            load.wait_answered(200, 20, timeout=30)
            time.sleep(rng.uniform(0.0, 0.5))
            daemon.kill()
            outcomes = load.join(timeout=20.0)
        acknowledged += [o.conversation_id for o in outcomes if o.status == 200]
        recorded = dict(rows(db_path, "SELECT conversation_id, kinds FROM changes"))
        missing = [cid for cid in acknowledged if cid not in recorded]
        assert not missing, f"round {round_}: answered 200 without a change: {missing[:10]}"
        assert {recorded[cid] for cid in acknowledged} == {f'{{"messages_added":{TURNS + 1},"created":1,"status":1}}'}
        # Atomic both ways: no stored conversation without its change, no change without its conversation.
        stored = {cid for (cid,) in rows(db_path, "SELECT id FROM conversations")}
        assert stored == set(recorded), f"round {round_}"
    assert len(acknowledged) > 80  # the kills landed under load
