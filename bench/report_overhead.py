"""BENCHMARKS.md's section for ``bench.overhead``: what the delivery log and the hardening cost durable ingest."""

from __future__ import annotations

from typing import Any

from bench.report import table

# Fewer rounds give no spread worth the name (one round: none), so no verdict.
MIN_ROUNDS_FOR_A_VERDICT = 3


def _percent(ratio: float) -> str:
    """A throughput ratio as a change: ``-3.1%``, ``+0.4%``."""
    return f"{(ratio - 1) * 100:+.1f}%"


def verdict(comparison: dict[str, Any]) -> str:
    """Of a throughput ratio: a loss below 1."""
    change, noise = _percent(comparison["ratio"]), f"{comparison['noise']:.1%}"
    if comparison["within_noise"]:
        return f"{change}, within the noise ({noise}): not told apart from it in this run"
    if comparison["ratio"] < 1:
        return f"{change}, **a loss** beyond the noise ({noise})"
    return f"{change}, a gain beyond the noise ({noise})"


def cpu_verdict(comparison: dict[str, Any]) -> str:
    """Of a CPU-time ratio: a cost above 1."""
    change, noise = _percent(comparison["ratio"]), f"{comparison['noise']:.1%}"
    if comparison["within_noise"]:
        return f"{change}, within the noise ({noise})"
    if comparison["ratio"] > 1:
        return f"{change}, **more CPU** beyond the noise ({noise})"
    return f"{change}, less CPU beyond the noise ({noise})"


def overhead_section(overhead: dict[str, Any]) -> list[str]:
    settings, daemons = overhead["settings"], overhead["daemons"]
    lines = [
        "## What the delivery log and the hardening cost",
        "",
        f"`python -m bench.overhead`: {len(daemons)} daemons serving at once, each on its own database, durable "
        f"acks (`synchronous = {settings['synchronous']}`), output to /dev/null; {settings['rounds']} rounds of "
        f"{settings['requests']:,} Tavus webhooks of {settings['turns']} messages from {settings['concurrency']} "
        "closed-loop senders to each daemon in turn, the order rotated every round. Beside each daemon's "
        "throughput, its own CPU time (all threads) per webhook, which moves less when other processes share the "
        "cores. The spread is the interquartile range of a daemon's rounds over their median; a difference is "
        "within the noise when it is no larger than the wider spread of the two daemons compared.",
        "",
    ]
    rows = []
    for daemon in daemons.values():
        rates = f"{daemon['min']:,}-{daemon['max']:,}"
        rows.append([daemon["label"], f"{daemon['median']:,}", rates, f"{daemon['spread']:.1%}"])
        rows[-1] += [f"{daemon['cpu_median']:.3f} ms", f"{daemon['cpu_spread']:.1%}"]
    header = ["daemon", "messages/s (median)", "rounds' range", "spread", "CPU per webhook (median)", "spread"]
    lines += table(header, rows)
    lines.append("")
    comparisons = overhead["comparisons"]
    judged = settings["rounds"] >= MIN_ROUNDS_FOR_A_VERDICT
    none = f"no verdict from {settings['rounds']} round(s)"
    rows = []
    for c in comparisons.values():
        paired = c["paired_ratios"]
        rows.append([c["what"], f"{c['ratio']:.3f}", f"{min(paired):.3f}-{max(paired):.3f}"])
        rows[-1] += [verdict(c) if judged else none, f"{c['cpu']['ratio']:.3f}"]
        rows[-1].append(cpu_verdict(c["cpu"]) if judged else none)
    if rows:
        header = ["comparison", "throughput ratio", "rounds paired in time", "verdict", "CPU per webhook", "verdict"]
        lines += table(header, rows)
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
