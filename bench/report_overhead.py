"""BENCHMARKS.md's section for ``bench.overhead``: what the delivery log and the hardening cost durable ingest."""

from __future__ import annotations

from typing import Any

from bench.report import table


def _percent(ratio: float) -> str:
    """A throughput ratio as a change: ``-3.1%``, ``+0.4%``."""
    return f"{(ratio - 1) * 100:+.1f}%"


def verdict(comparison: dict[str, Any]) -> str:
    change, noise = _percent(comparison["ratio"]), f"{comparison['noise']:.1%}"
    if comparison["within_noise"]:
        return f"{change}, within this run's noise ({noise}): no loss measurable"
    if comparison["ratio"] < 1:
        return f"{change}, **a loss** larger than this run's noise ({noise})"
    return f"{change}, a gain larger than this run's noise ({noise})"


def overhead_section(overhead: dict[str, Any]) -> list[str]:
    settings, daemons = overhead["settings"], overhead["daemons"]
    lines = [
        "## What the delivery log and the hardening cost",
        "",
        f"`python -m bench.overhead`: {len(daemons)} daemons serving at once, each on its own database, durable "
        f"acks (`synchronous = {settings['synchronous']}`), output to /dev/null; {settings['rounds']} rounds of "
        f"{settings['requests']:,} Tavus webhooks of {settings['turns']} messages from {settings['concurrency']} "
        "closed-loop senders to each daemon in turn, the order rotated every round. The spread is the "
        "interquartile range of a daemon's rounds over their median; a difference is within the noise when it is "
        "no larger than the wider spread of the two daemons compared.",
        "",
    ]
    rows = []
    for daemon in daemons.values():
        rates = f"{daemon['min']:,}-{daemon['max']:,}"
        rows.append([daemon["label"], f"{daemon['median']:,}", rates, f"{daemon['spread']:.1%}"])
    lines += table(["daemon", "messages/s (median)", "rounds' range", "spread"], rows)
    lines.append("")
    comparisons = overhead["comparisons"]
    rows = []
    for c in comparisons.values():
        paired = c["paired_ratios"]
        rows.append([c["what"], f"{c['ratio']:.3f}", f"{min(paired):.3f}-{max(paired):.3f}", verdict(c)])
    if rows:
        lines += table(["comparison", "ratio of medians", "rounds paired in time", "verdict"], rows)
    if overhead.get("skipped"):
        lines += ["", f"_Not compared in this run: {overhead['skipped']}._"]
    line = overhead.get("log_line") or {}
    if line:
        costs = []
        for fmt, cost in line.items():
            counted = cost.get("instructions_per_line")
            costs.append(f"{fmt} {cost['us_per_line']} µs" + (f" ({counted:,} instructions)" if counted else ""))
        lines += [
            "",
            "One delivery's log line on its own (`python -m bench.log_line`: the daemon's handler, mask and "
            f"formatter, to /dev/null): {', '.join(costs)}.",
        ]
    return lines
