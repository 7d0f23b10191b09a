"""The BENCHMARKS.md section for ``bench.outbox_cost`` (what the transactional outbox costs ingest)."""

from __future__ import annotations

from typing import Any

from bench.report import table


def outbox_section(figures: dict[str, Any]) -> list[str]:
    settings = figures["settings"]
    rows = []
    for n, pair in enumerate(figures["rounds"], start=1):
        on, off = pair["on"], pair["off"]
        on_rate, off_rate = on["stored_messages_per_s"] or 0.0, off["stored_messages_per_s"] or 0.0
        cost = f"{1 - on_rate / off_rate:.1%}" if off_rate else "n/a"
        rows.append([str(n), f"{on_rate:,.0f}", f"{off_rate:,.0f}", cost])
    cost = figures["cost_of_medians"]
    spread = figures["cost_spread"]
    if cost is None or not spread:
        verdict = "No figure: nothing was stored."
    else:
        rounds = f"medians of {settings['rounds']} rounds; rounds from {spread[0]:.1%} to {spread[1]:.1%}"
        if cost <= 0:
            verdict = f"No cost of the outbox showed in the stored messages per second ({rounds})."
        else:
            goal = "under" if cost < 0.10 else "not under"
            verdict = f"The outbox cost {cost:.1%} of the stored messages per second ({rounds}): {goal} the 10% goal."
        if spread[1] - spread[0] > 0.10:
            verdict += (
                " The rounds spread wider than the goal itself (a busy machine moves both): re-run on a quiet one"
                " before concluding."
            )
    checks = (
        "every acknowledged transcript had its one change, none was lost, and the runs without the outbox "
        "recorded nothing"
        if figures["one_change_per_transcript"] and not figures["lost_all_rounds"] and figures["off_recorded_nothing"]
        else "**a check failed**: see `outbox_cost.json`"
    )
    return [
        "## What the outbox costs ingest",
        "",
        f"`python -m bench.outbox_cost`: durable ingest of {settings['requests']:,} Tavus transcripts of "
        f"{settings['turns']} turns at {settings['concurrency']} senders, with `changes.enabled` on and off, "
        "alternated in one run, each on a fresh database.",
        "",
        *table(["round", "on: messages/s stored", "off: messages/s stored", "cost"], rows),
        "",
        f"{verdict} {cpu_line(figures)}In every round {checks}.",
        *writer_alone_lines(figures.get("writer_alone") or []),
    ]


def writer_alone_lines(runs: list[dict[str, Any]]) -> list[str]:
    """What the outbox adds to one commit, by commit size: a fixed cost (its rows, its index and
    sqlite_sequence are three more pages to write and sync), so the larger the commit the smaller the share."""
    if not runs:
        return []
    rows = [
        [
            str(run["per_commit"]),
            f"{run['ms_per_commit_on']:.2f} ms",
            f"{run['ms_per_commit_off']:.2f} ms",
            f"{run['ms_per_commit_on'] - run['ms_per_commit_off']:+.2f} ms",
            f"{run['cost']:.1%}",
        ]
        for run in runs
    ]
    return [
        "",
        f"The writer alone (`commit_batch` on {runs[0]['transcripts']} parsed transcripts, `synchronous = full`, "
        "no HTTP), with the outbox and without, alternately, medians:",
        "",
        *table(["transcripts a commit", "a commit, on", "off", "the outbox adds", "cost"], rows),
    ]


def cpu_line(figures: dict[str, Any]) -> str:
    cost, spread = figures.get("cpu_cost_of_medians"), figures.get("cpu_cost_spread")
    if cost is None or not spread:
        return ""
    return (
        f"In the daemon's CPU time per message stored, which the other work on a shared machine moves less, it "
        f"cost {cost:.1%} ({figures['median_on_cpu_us_per_message']:.1f} against "
        f"{figures['median_off_cpu_us_per_message']:.1f} µs; rounds from {spread[0]:.1%} to {spread[1]:.1%}). "
    )
