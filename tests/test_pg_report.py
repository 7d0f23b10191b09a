"""The PostgreSQL section of BENCHMARKS.md follows from bench.pg_ceiling's JSON, and says so when it is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report import render


def step(rows_per_s: float, commits: int = 50) -> dict[str, float]:
    rows = 80_800
    return {
        "rows": rows,
        "commits": commits,
        "seconds": rows / rows_per_s,
        "rows_per_s": rows_per_s,
        "commits_per_s": commits / (rows / rows_per_s),
    }


def ceiling(copy: float, unnest: float, ours: float) -> dict[str, Any]:
    settings = {"transcripts": 800, "turns": 100, "per_commit": 16, "rounds": 3, "synchronous_commit": "on"}
    return {
        "settings": settings,
        "server_version": "15.9",
        "copy": step(copy),
        "unnest": step(unnest),
        "group_commit": step(ours),
    }


def test_the_postgres_section_gives_each_way_as_a_share_of_copy(tmp_path: Path) -> None:
    (tmp_path / "pg_ceiling.json").write_text(json.dumps(ceiling(60_000.0, 30_000.0, 21_000.0)))
    document = render(tmp_path)
    section = document[document.index("## PostgreSQL") :]
    assert "| `COPY messages FROM STDIN` (binary): the ceiling | 60,000 | 100% |" in section
    assert "| 30,000 | 50% |" in section
    assert "| 21,000 | 35% |" in section
    assert "PostgreSQL 15.9" in section
    assert "| 1,616 |" in section  # rows per commit: 80,800 rows in 50 commits


def test_a_missing_postgres_result_is_named(tmp_path: Path) -> None:
    assert "`pg_ceiling.json` is missing" in render(tmp_path)


def replica_run(replicas: int, senders: int, messages_per_s: float, copy: float, **extra: Any) -> dict[str, Any]:
    commits, rows = 120.0, 48_480.0
    run: dict[str, Any] = {
        "replicas": replicas,
        "senders": senders,
        "requests": 400,
        "ok": 400,
        "statuses": {"200": 400},
        "seconds": 10.0,
        "messages_per_s": messages_per_s,
        "latency_ms": {"p50": 180.4, "p95": 410.0, "p99": 1_250.6, "max": 1_300.0, "mean": 200.0},
        "commits": commits,
        "commits_per_s": commits / 10.0,
        "rows_per_commit": rows / commits,
        "lost": 0,
        "lost_sample": [],
        "excess": 0,
        "copy": {"before": {}, "after": {}, "rows_per_s": copy},
        "of_copy": messages_per_s / copy,
    }
    return {**run, **extra}


def daemon(*runs: dict[str, Any], claim: float | None) -> dict[str, Any]:
    settings = {
        "replicas": [1, 2],
        "senders": [1, 16, 64],
        "turns": 100,
        "ack": "durable",
        "synchronous": "full",
        "copy_transcripts": 96,
        "copy_per_commit": 16,
    }
    return {
        "settings": settings,
        "machine": {"cpus": 2},
        "claim": {"replicas": 2, "senders": 16, "at_least": 0.3, "goal": 0.5, "of_copy": claim},
        "runs": list(runs),
    }


def rendered(tmp_path: Path, result: dict[str, Any]) -> str:
    (tmp_path / "pg_daemon.json").write_text(json.dumps(result))
    document = render(tmp_path)
    return document[document.index("### transcriptd serve on PostgreSQL") :]


def test_the_daemon_table_gives_each_run_against_its_own_copy(tmp_path: Path) -> None:
    result = daemon(replica_run(1, 16, 9_000.0, 30_000.0), replica_run(2, 16, 12_000.0, 24_000.0), claim=0.5)
    section = rendered(tmp_path, result)
    assert "| 1 | 16 | 9,000 | 0.30 | 30,000 | 180 | 410 | 1,251 | 12.0 | 404 | 400 x 200 |" in section
    assert "| 2 | 16 | 12,000 | 0.50 | 24,000 |" in section
    assert "2 replicas at 16 senders: 0.50 of COPY's rows/s (at least 0.3, goal 0.5): it meets the goal." in section
    assert "All 800 transcripts answered 200 were found with every message, once." in section
    assert "Against the ceiling step's COPY" not in section  # no pg_ceiling.json in this run


def test_the_claim_is_also_given_against_the_ceiling_steps_copy(tmp_path: Path) -> None:
    (tmp_path / "pg_ceiling.json").write_text(json.dumps(ceiling(60_000.0, 30_000.0, 21_000.0)))
    result = daemon(replica_run(1, 16, 9_000.0, 30_000.0), replica_run(2, 16, 12_000.0, 24_000.0), claim=0.5)
    section = rendered(tmp_path, result)
    assert "Against the ceiling step's COPY (60,000 rows/s, a fresh table): 0.20." in section


def test_a_run_under_the_floor_and_a_lost_transcript_are_said(tmp_path: Path) -> None:
    short = replica_run(2, 16, 5_000.0, 25_000.0, statuses={"0": 1, "200": 398, "503": 1}, ok=398, lost=2)
    section = rendered(tmp_path, daemon(short, claim=0.2))
    assert "0.20 of COPY's rows/s (at least 0.3, goal 0.5): it **is under the floor**." in section
    assert "**2 of the 398 transcripts answered 200 were not stored exactly once**" in section
    assert "1 x no answer, 398 x 200, 1 x 503" in section


def test_a_missing_daemon_result_is_named(tmp_path: Path) -> None:
    assert "`pg_daemon.json` is missing" in render(tmp_path)
