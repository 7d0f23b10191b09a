"""No open reads on the network: serve refuses a non-loopback address without api.token (unless told reads are
meant to be open to everyone), and warns at start-up whenever reads need no token."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from daemon.exposure import is_loopback, open_reads_warning, refusal
from tests.conftest import make_config
from tests.daemon_process import REPO, daemon_env, free_port, managed, serve_argv, start_daemon
from tests.payloads import encode, transcription_ready

API_TOKEN = "read-s3cret"
METRICS_TOKEN = "metr1cs-s3cret"


# --- what counts as loopback -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("192.168.1.10", False),
        ("::ffff:10.0.0.5", False),
        ("transcripts.example.com", False),
        ("localhost.example.com", False),
        ("128.0.0.1", False),
    ],
)
def test_loopback_is_127_slash_8_ipv6_one_and_localhost_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_only_a_network_address_without_token_or_override_is_refused(tmp_path: Path) -> None:
    refused = refusal(make_config(tmp_path / "x.db", **{"server.host": "0.0.0.0"}))
    assert refused is not None
    assert "api.token" in refused
    assert "api.reads_open_to_everyone" in refused
    assert "'0.0.0.0'" in refused
    assert "\n" not in refused
    for allowed in (
        {"server.host": "127.0.0.1"},
        {"server.host": "0.0.0.0", "api.token": API_TOKEN},
        {"server.host": "0.0.0.0", "api.reads_open_to_everyone": True},
    ):
        assert refusal(make_config(tmp_path / "x.db", **allowed)) is None, allowed
    # The warning: whenever reads are open, and never when api.token guards them.
    assert open_reads_warning(make_config(tmp_path / "x.db", **{"api.token": API_TOKEN})) is None
    assert open_reads_warning(make_config(tmp_path / "x.db", **{"api.metrics_token": METRICS_TOKEN})) is not None


# --- serve, as a real process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(("--host", "0.0.0.0"), {}, id="flag"),
        pytest.param((), {"TRANSCRIPTD_SERVER_HOST": "0.0.0.0"}, id="env"),
        pytest.param(("--host", "0.0.0.0"), {"TRANSCRIPTD_API_READS_OPEN_TO_EVERYONE": "false"}, id="override-off"),
    ],
)
def test_serve_on_the_network_without_token_exits_2_naming_the_setting_and_never_listens(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    db_path = tmp_path / "never.db"
    done = subprocess.run(
        serve_argv("--db", str(db_path), "--port", str(free_port()), *args),
        cwd=tmp_path,
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert done.stderr.startswith("transcriptd: "), output
    assert len(done.stderr.strip().splitlines()) == 1, output
    assert "api.token" in done.stderr, output
    assert "api.reads_open_to_everyone = true" in done.stderr, output
    # Refused before the database and the server: nothing created, nothing listened.
    assert not db_path.exists()
    assert "Uvicorn running" not in output
    assert "Traceback" not in output


def test_serve_on_the_network_with_the_override_starts_answers_reads_and_warns(tmp_path: Path) -> None:
    env = {"TRANSCRIPTD_API_READS_OPEN_TO_EVERYONE": "true"}
    daemon = start_daemon(tmp_path, tmp_path / "open.db", args=("--host", "0.0.0.0"), env=env)
    with managed(daemon), httpx.Client(base_url=daemon.base_url, trust_env=False, timeout=10) as client:
        stored = client.post("/webhooks/tavus", content=encode(transcription_ready("c-open", turns=3)))
        assert stored.status_code == 200, stored.text
        read = client.get("/conversations/c-open/messages")  # no Authorization: that is what was asked for
        assert read.status_code == 200, read.text
        assert len(read.json()["messages"]) == 3
        assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "reads are open" in line]
    assert len(warnings) == 1, log
    assert "ANYONE who can reach it" in warnings[0]
    assert "0.0.0.0" in warnings[0]


def test_serve_on_loopback_without_token_starts_and_warns(tmp_path: Path) -> None:
    with managed(start_daemon(tmp_path, tmp_path / "local.db")) as daemon:
        assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "reads are open" in line]
    assert len(warnings) == 1, log
    assert "anyone on this host" in warnings[0]
    assert "api.token" in warnings[0]


# --- the deployment guide's proxies ----------------------------------------------------------------------


def active_lines(block: str) -> str:
    """The block without its comment lines: what the proxy runs if pasted as it is."""
    return "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))


def guide_block(language: str) -> str:
    guide = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", guide, re.DOTALL)
    assert blocks, f"no {language} block in docs/deployment.md"
    # The first is the whole example; a later one (replicas on PostgreSQL) shows only what changes, and
    # forwards the webhooks alone as well.
    for later in blocks[1:]:
        forwarded = re.findall(r"location\s+([^{]+?)\s*\{[^}]*proxy_pass", active_lines(later))
        assert all(path.startswith("/webhooks/") for path in forwarded), forwarded
    return blocks[0]


def test_the_nginx_example_forwards_only_the_webhooks_and_the_reads_are_an_opt_in_needing_the_token() -> None:
    block = guide_block("nginx")
    locations = re.findall(r"location\s+([^{]+?)\s*\{([^}]*)\}", active_lines(block))
    forwarded = [path for path, body in locations if "proxy_pass" in body]
    assert "/webhooks/" in forwarded
    assert all(path.startswith("/webhooks/") for path in forwarded), forwarded
    assert ("/", "\n        return 404;\n    ") in locations
    opt_in = block[block.index("OPT-IN") : block.index("end of the opt-in")]
    assert "api.token" in opt_in
    assert "conversations" in opt_in


def test_the_caddy_example_forwards_only_the_webhooks_and_the_reads_are_an_opt_in_needing_the_token() -> None:
    block = guide_block("caddy")
    active = active_lines(block)
    handles = re.findall(r"handle\s*([^{]*?)\s*\{([^}]*)\}", active)
    assert [matcher for matcher, body in handles if "reverse_proxy" in body] == ["/webhooks/*"]
    assert active.count("reverse_proxy") == 1  # none outside a handle, which would forward everything
    opt_in = block[block.index("OPT-IN") : block.index("end of the opt-in")]
    assert "api.token" in opt_in
    assert "/conversations" in opt_in
