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
