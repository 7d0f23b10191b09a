"""The outbox section of BENCHMARKS.md follows the figures of ``outbox_cost.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.outbox_cost import summarise
from bench.report import render


def run(rate: float, changes: int, lost: int = 0) -> dict[str, Any]:
    cpu = 1e6 / rate  # as if the daemon were CPU-bound
    return {
        "stored_messages_per_s": rate,
        "cpu_us_per_message": cpu,
        "lost": lost,
        "changes": changes,
        "acknowledged": 100,
    }


@pytest.mark.parametrize(
    ("on", "off", "cost", "goal"), [(95.0, 100.0, "5.0%", "under"), (80.0, 100.0, "20.0%", "not under")]
)
def test_the_cost_and_the_goal_follow_the_numbers(tmp_path: Path, on: float, off: float, cost: str, goal: str) -> None:
    rounds = [[run(on, 100), run(off, 0)] for _ in range(3)]
    settings = {"rounds": 3, "requests": 100, "concurrency": 16, "turns": 100}
    alone = [{"per_commit": 8, "transcripts": 320, "ms_per_commit_on": 5.5, "ms_per_commit_off": 5.0, "cost": 0.1}]
    figures = {"settings": settings, **summarise(rounds), "writer_alone": alone}
    (tmp_path / "outbox_cost.json").write_text(json.dumps(figures))
    text = render(tmp_path)
    assert f"The outbox cost {cost} of the stored messages per second" in text
    assert f"{goal} the 10% goal" in text
    assert "re-run on a quiet one" not in text  # every round alike
    assert "In the daemon's CPU time per message stored" in text
    assert "a check failed" not in text
    assert "| 8 | 5.50 ms | 5.00 ms | +0.50 ms | 10.0% |" in text


def test_no_cost_and_a_wide_spread_are_said_so(tmp_path: Path) -> None:
    rounds = [[run(110.0, 100), run(100.0, 0)], [run(80.0, 100), run(100.0, 0)], [run(105.0, 100), run(100.0, 0)]]
    settings = {"rounds": 3, "requests": 100, "concurrency": 16, "turns": 100}
    (tmp_path / "outbox_cost.json").write_text(json.dumps({"settings": settings, **summarise(rounds)}))
    text = render(tmp_path)
    assert "No cost of the outbox showed in the stored messages per second" in text
    assert "re-run on a quiet one" in text


def test_a_missing_change_is_called_out(tmp_path: Path) -> None:
    rounds = [[run(95.0, 99), run(100.0, 0)]]
    settings = {"rounds": 1, "requests": 100, "concurrency": 16, "turns": 100}
    (tmp_path / "outbox_cost.json").write_text(json.dumps({"settings": settings, **summarise(rounds)}))
    assert "**a check failed**" in render(tmp_path)
