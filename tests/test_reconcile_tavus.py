"""``transcriptd reconcile --source tavus`` against a local stand-in of Tavus's API.

The scenario that matters: the daemon was down while the calls' callbacks were sent. Reconcile then
stores exactly what those callbacks would have stored (compared with a second database fed by them),
a second run adds nothing, and the late callbacks add no message and change no field.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import cli_argv, daemon_env, transcriptd
from tests.payloads import encode, envelope, transcription_ready
from tests.reconcile_tools import count, post_webhooks, snapshot
from tests.vendor_standin import TAVUS_KEY, StandIn, tavus_api, tavus_conversation

pytestmark = pytest.mark.anyio

RECENT = 40  # in the window: two pages and more of the stand-in's 25
OLD = 2  # started before the window: never fetched


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def callbacks(cid: str, seed: int) -> list[dict[str, Any]]:
    """What Tavus posts for one call: both join events, the shutdown, the transcript, maybe the analysis."""
    bodies = [
        envelope(cid, "system.replica_joined", {"replica_id": "r79e1c033f"}, timestamp="2025-03-01T10:00:00Z"),
        envelope(cid, "system.pal_joined", {"replica_id": "r79e1c033f"}, timestamp="2025-03-01T10:00:00Z"),
        envelope(
            cid,
            "system.shutdown",
            {"replica_id": "r79e1c033f", "shutdown_reason": "participant_left_timeout"},
            timestamp="2025-03-01T10:20:00Z",
        ),
        transcription_ready(cid, turns=6 + seed % 5, seed=seed),
    ]
    if seed % 2:
        bodies.append(envelope(cid, "application.perception_analysis", {"analysis": f"# Call {cid}\nCalm."}))
    return bodies


@pytest.fixture
def tavus() -> Iterator[tuple[StandIn, dict[str, list[dict[str, Any]]]]]:
    """The stand-in holding RECENT ended calls of the last hours and OLD ones from before the window."""
    now = time.time()
    calls: dict[str, list[dict[str, Any]]] = {}
    with tavus_api() as standin:
        for i in range(RECENT + OLD):
            cid = f"c{i:03d}"
            started = now - 60 * (i + 1) if i < RECENT else now - 5 * 3600 - i
            calls[cid] = callbacks(cid, i)
            standin.conversations[cid] = tavus_conversation(cid, iso(started), calls[cid])
        yield standin, calls


def reconcile(
    tmp_path: Path, standin: StandIn, db: Path, *args: str, key: str = TAVUS_KEY
) -> subprocess.CompletedProcess[str]:
    env = {"TRANSCRIPTD_WEBHOOKS_TAVUS_API_KEY": key, "TRANSCRIPTD_WEBHOOKS_TAVUS_API_URL": standin.base_url}
    return transcriptd("reconcile", "--source", "tavus", "--db", str(db), *args, cwd=tmp_path, timeout=120, env=env)


def webhook_bodies(calls: dict[str, list[dict[str, Any]]], ids: list[str]) -> list[bytes]:
    return [encode(body) for cid in ids for body in calls[cid]]


async def test_reconcile_stores_what_the_webhooks_would_have_and_a_second_run_and_late_webhooks_add_nothing(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = tavus
    recent = [f"c{i:03d}" for i in range(RECENT)]
    # The reference: every callback arrived.
    fed = tmp_path / "webhooks.db"
    await post_webhooks(fed, "/webhooks/tavus", webhook_bodies(calls, recent))
    # The daemon that was down: c000 arrived whole, c001 only its join; nothing else.
    down = tmp_path / "down.db"
    await post_webhooks(down, "/webhooks/tavus", [*webhook_bodies(calls, ["c000"]), encode(calls["c001"][0])])

    # A 429 on the first page, a 503 and a slow answer on two fetches.
    standin.fail("/v2/conversations", 429, retry_after="1")
    standin.fail("/v2/conversations/c005", 503)
    standin.slow("/v2/conversations/c007", 0.5)
    done = reconcile(tmp_path, standin, down, "--since", "3h")
    assert done.returncode == 0, done.stderr
    assert f"found {RECENT}, {RECENT - 1} missing or incomplete here" in done.stdout
    assert f"fetched {RECENT - 1}, stored {RECENT - 1} (" in done.stdout
    assert "0 could not be completed" in done.stdout
    assert "\r" not in done.stdout  # no progress bar when standard output is not a terminal
    # The 429 was waited out, the list was paged through, c005 was asked again after its 503.
    pages = [s for s in standin.requests_to("/v2/conversations") if s.path == "/v2/conversations"]
    assert [s.status for s in pages if "page=1" in s.query.split("&")] == [429, 200]
    assert any("page=2" in s.query.split("&") for s in pages)
    assert [s.status for s in standin.requests_to("/v2/conversations/c005")] == [503, 200]
    assert not standin.requests_to("/v2/conversations/c040")  # before the window
    assert not standin.requests_to("/v2/conversations/c000")  # complete here already
    assert TAVUS_KEY not in done.stdout + done.stderr

    assert snapshot(down, recent) == snapshot(fed, recent)
    assert count(down, "SELECT count(*) FROM conversations WHERE id IN ('c040', 'c041')") == 0

    # A second run: nothing missing, nothing stored.
    events = count(down, "SELECT count(*) FROM events")
    again = reconcile(tmp_path, standin, down, "--since", "3h")
    assert again.returncode == 0, again.stderr
    assert f"found {RECENT}, 0 missing or incomplete here" in again.stdout
    assert count(down, "SELECT count(*) FROM events") == events
    assert snapshot(down, recent) == snapshot(fed, recent)

    # The late callbacks: no message inserted or changed, no field changed.
    answers = await post_webhooks(down, "/webhooks/tavus", webhook_bodies(calls, recent))
    assert sum(a["inserted"] + a["updated"] for a in answers) == 0
    assert snapshot(down, recent) == snapshot(fed, recent)


async def test_a_conversation_fetched_by_id_twice_stores_nothing_the_second_time(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", [encode(calls["c003"][0])])  # the join only
    first = reconcile(tmp_path, standin, db, "--conversation", "c003")
    assert first.returncode == 0, first.stderr
    assert "stored 1 (" in first.stdout
    events = count(db, "SELECT count(*) FROM events")
    second = reconcile(tmp_path, standin, db, "--conversation", "c003")
    assert second.returncode == 0, second.stderr
    assert "fetched 1, stored 0 (0 messages inserted, 0 updated)" in second.stdout
    assert count(db, "SELECT count(*) FROM events") == events
    fed = tmp_path / "fed.db"
    await post_webhooks(fed, "/webhooks/tavus", webhook_bodies(calls, ["c003"]))
    assert snapshot(db, ["c003"]) == snapshot(fed, ["c003"])


async def test_dry_run_lists_what_it_would_fetch_and_stores_nothing(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", [])
    done = reconcile(tmp_path, standin, db, "--since", "90m", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would fetch tavus conversation 'c000' (not here)" in done.stdout
    assert "dry run: nothing fetched or stored" in done.stdout
    assert count(db, "SELECT count(*) FROM conversations") == 0
    assert not [s for s in standin.requests_to("/v2/conversations/") if s.path != "/v2/conversations"]


async def test_a_wrong_key_is_named_as_a_401_and_the_key_shows_nowhere(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", [])
    wrong = TAVUS_KEY + "-wrong"
    done = reconcile(tmp_path, standin, db, "--since", "3h", key=wrong)
    assert done.returncode == 1
    assert "could not list tavus conversations: tavus API GET /v2/conversations: HTTP 401" in done.stderr
    assert wrong not in done.stdout + done.stderr


async def test_an_outage_names_each_conversation_not_completed_and_exits_1(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", [])
    standin.fail("/v2/conversations/c002", 502, times=10)
    done = reconcile(tmp_path, standin, db, "--conversation", "c002", "--config", str(_fast_retries(tmp_path)))
    assert done.returncode == 1
    named = "tavus conversation 'c002' not completed: tavus API GET /v2/conversations/c002: HTTP 502 after 2"
    assert named in done.stderr
    assert count(db, "SELECT count(*) FROM conversations") == 0


def test_without_an_api_key_reconcile_says_which_setting_and_exits_2(tmp_path: Path) -> None:
    done = transcriptd("reconcile", "--source", "tavus", "--db", str(tmp_path / "none.db"), cwd=tmp_path)
    assert done.returncode == 2
    assert "webhooks.tavus.api_key" in done.stderr


@pytest.mark.parametrize("text", ["3", "h", "-2h", "0m", "1w"])
def test_a_bad_duration_is_refused(tmp_path: Path, text: str) -> None:
    done = transcriptd("reconcile", "--source", "tavus", f"--since={text}", cwd=tmp_path)
    assert done.returncode == 2
    assert "not a duration" in done.stderr


def _fast_retries(tmp_path: Path) -> Path:
    config = tmp_path / "fast.toml"
    config.write_text("[reconcile]\nmax_attempts = 2\n")
    return config


async def test_a_progress_bar_shows_on_a_terminal(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, _ = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", [])
    env = daemon_env(
        {"TRANSCRIPTD_WEBHOOKS_TAVUS_API_KEY": TAVUS_KEY, "TRANSCRIPTD_WEBHOOKS_TAVUS_API_URL": standin.base_url}
    )
    argv = cli_argv("reconcile", "--source", "tavus", "--db", str(db), "--since", "30m")
    code, shown = _on_a_terminal(argv, tmp_path, env)
    assert code == 0
    assert "] 29/29 conversations" in shown  # c000 to c028 started in the last 30 minutes
    assert "\r[" + "#" * 30 + "]" in shown
    assert "fetched 29, stored 29" in shown


def _on_a_terminal(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with its standard output on a pseudo-terminal; its exit code and what it showed there."""
    leader, follower = pty.openpty()
    with subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower) as process:
        os.close(follower)
        shown = _read_all(leader, deadline=time.monotonic() + 60)
        return process.wait(60), shown


def _read_all(fd: int, *, deadline: float) -> str:
    """Everything written to the terminal until the process closes it (EIO on Linux), within ``deadline``."""
    chunks: list[bytes] = []
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


async def test_an_erased_conversation_is_not_fetched_back(
    tmp_path: Path, tavus: tuple[StandIn, dict[str, list[dict[str, Any]]]]
) -> None:
    standin, calls = tavus
    db = tmp_path / "t.db"
    await post_webhooks(db, "/webhooks/tavus", webhook_bodies(calls, ["c004"]))
    erased = transcriptd("delete", "--conversation", "c004", "--db", str(db), cwd=tmp_path)
    assert erased.returncode == 0, erased.stderr
    done = reconcile(tmp_path, standin, db, "--since", "10m")
    assert done.returncode == 0, done.stderr
    assert not standin.requests_to("/v2/conversations/c004")
    assert count(db, "SELECT count(*) FROM conversations WHERE id = 'c004'") == 0
    assert count(db, "SELECT count(*) FROM conversations") > 0  # the others were fetched
