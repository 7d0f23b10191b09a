"""BENCHMARKS.md's overhead section: its ratios and verdicts follow from the figures in overhead.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.overhead import Daemon, compare, spread, summary
from bench.report import render


def served(key: str, rates: list[float], cpu_ms: list[float]) -> Daemon:
    statuses = {"200": 10 * len(rates)}
    return Daemon(key, f"daemon {key}", Path("."), {}, rates=rates, cpu_ms=cpu_ms, statuses=statuses)


def results(
    log_on: list[float], log_off: list[float], before: list[float] | None, cpu: tuple[float, float] = (1.0, 1.0)
) -> dict[str, Any]:
    """Throughputs by round; every round of log-on takes ``cpu[0]`` ms per webhook, the others ``cpu[1]``."""
    daemons = [served("log-on", log_on, [cpu[0]] * len(log_on)), served("log-off", log_off, [cpu[1]] * len(log_off))]
    daemons += [served("before", before, [cpu[1]] * len(before))] if before is not None else []
    by_key = {d.key: d for d in daemons}
    comparisons = {"log": {"what": "the delivery log on vs off", **compare(by_key["log-on"], by_key["log-off"])}}
    if before is not None:
        comparisons["hardening"] = {"what": "this code vs before", **compare(by_key["log-on"], by_key["before"])}
    return {
        "settings": {"rounds": len(log_on), "requests": 1500, "concurrency": 16, "turns": 100, "synchronous": "full"},
        "skipped": None if before is not None else "commit c8aee86 is not in this repository",
        "log_line": {"text": {"us_per_line": 8.1, "instructions_per_line": 72_000}, "json": {"us_per_line": 11.0}},
        "daemons": {d.key: summary(d) for d in daemons},
        "comparisons": comparisons,
    }


def section(tmp_path: Path, data: dict[str, Any]) -> str:
    (tmp_path / "overhead.json").write_text(json.dumps(data))
    text = render(tmp_path)
    return text[text.index("## What the delivery log and the hardening cost") :]


def test_spread_is_the_interquartile_range_over_the_median() -> None:
    assert spread([100.0, 100.0, 100.0, 100.0]) == 0
    assert spread([90.0, 100.0, 110.0]) == pytest.approx(0.1)
    assert spread([100.0]) == 0


def test_a_difference_inside_the_rounds_spread_is_no_measurable_loss(tmp_path: Path) -> None:
    text = section(tmp_path, results([99.0, 101.0, 95.0, 105.0], [100.0, 102.0, 96.0, 104.0], [100.0] * 4))
    assert "| the delivery log on vs off | 0.990 |" in text
    assert "-1.0%, within the noise (4.0%): not told apart from it in this run" in text
    assert "**a loss**" not in text
    assert "| 1.000 | +0.0%, within the noise (0.0%) |" in text
    assert "text 8.1 µs (72,000 instructions), json 11.0 µs." in text


def test_a_difference_beyond_the_spread_is_called_a_loss(tmp_path: Path) -> None:
    text = section(
        tmp_path,
        results([90.0, 90.5, 89.5, 90.0], [100.0, 100.5, 99.5, 100.0], [100.0, 101.0, 99.0, 100.0], cpu=(1.1, 1.0)),
    )
    log_row = next(line for line in text.splitlines() if line.startswith("| the delivery log on vs off"))
    assert "| 0.900 | 0.899-0.900 |" in log_row
    assert "-10.0%, **a loss** beyond the noise (0.3%)" in log_row
    assert "| 1.100 | +10.0%, **more CPU** beyond the noise (0.0%) |" in log_row
    assert "| 1.100 ms | 0.0% |" in text
    assert "this code vs before" in text


def test_fewer_than_three_rounds_give_no_verdict(tmp_path: Path) -> None:
    text = section(tmp_path, results([90.0, 91.0], [100.0, 100.0], [100.0, 100.0], cpu=(1.1, 1.0)))
    log_row = next(line for line in text.splitlines() if line.startswith("| the delivery log on vs off"))
    assert log_row.count("no verdict from 2 round(s)") == 2
    assert "beyond the noise" not in text


def test_without_the_old_commit_the_section_says_what_was_not_compared(tmp_path: Path) -> None:
    text = section(tmp_path, results([100.0, 100.0, 100.0], [100.0, 100.0, 100.0], None))
    assert "the delivery log on vs off" in text
    assert "this code vs before" not in text
    assert "_Not compared in this run: commit c8aee86 is not in this repository._" in text


def test_no_results_is_named_not_invented(tmp_path: Path) -> None:
    assert "`overhead.json` is missing" in render(tmp_path)
