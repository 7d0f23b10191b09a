"""What the transactional outbox costs durable ingest: transcriptd with ``changes.enabled`` on and off.

    python -m bench.outbox_cost --output bench/results/outbox_cost.json [--rounds 5] [--requests 1600]
                                [--concurrency 16]

Each round runs the two alternately (on then off, then off then on: neither always goes first on a
warmer machine), each on a fresh database, as ``bench.compare`` runs transcriptd: a closed loop of
``--concurrency`` senders, durable acks, every acknowledged transcript verified in the database. The
figure is the stored messages per second; the cost is one minus the ratio on/off, per round and of the
medians, with the spread of the rounds beside it (a shared machine moves both). The daemon's CPU time
per message stored is compared the same way: on a machine shared with other work it moves less than a
rate does. Each "on" run also checks that the outbox recorded one change per acknowledged transcript.
Then the writer alone (``commit_batch`` on parsed transcripts, no HTTP) in commits of 2, 8 and 32, on
and off alternately: what the outbox adds to one commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare import CONTENT_CHARS, TURNS
from bench.load import load
from bench.machine import describe
from bench.payloads import encode, transcription_ready
from bench.processes import start_transcriptd, stop
from daemon.sources import tavus
from storage.connection import open_writer
from storage.migrations import migrate
from storage.writes import commit_batch

VARIANTS = {"on": "true", "off": "false"}


def run_one(variant: str, db: Path, *, requests: int, concurrency: int, prefix: str) -> dict[str, Any]:
    process, port = start_transcriptd(db, env={"TRANSCRIPTD_CHANGES_ENABLED": VARIANTS[variant]})
    try:
        cpu_before = cpu_seconds(process.pid)  # after start-up (imports, migrations): the run's own CPU
        report = load(
            f"http://127.0.0.1:{port}",
            concurrency=concurrency,
            requests=requests,
            turns=TURNS,
            content_chars=CONTENT_CHARS,
            verify_db=db,
            verify_timeout_s=120.0,
            id_prefix=prefix,
            warmup=concurrency,
        )
        cpu_s = cpu_seconds(process.pid) - cpu_before
    finally:
        exit_code = stop(process)
    results = report["results"]
    stored = results["throughput"]["stored"] or {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (changes,) = conn.execute("SELECT count(*) FROM changes").fetchone()
    acknowledged = sum(count for status, count in results["statuses"].items() if status.startswith("2"))
    # The warm-up deliveries are stored too, and their CPU is counted: so are their messages.
    settings = report["settings"]
    messages = (stored.get("messages") or 0) + settings["warmup"] * settings["messages_per_request"]
    return {
        "variant": variant,
        "stored_messages_per_s": stored.get("messages_per_s"),
        # The daemon's CPU time (user + system, every thread, over the run) per message stored: less at the
        # mercy of the other processes on a shared machine than a rate is.
        "cpu_us_per_message": 1e6 * cpu_s / messages if messages else None,
        "ack_requests_per_s": (results["throughput"]["ack"] or {}).get("requests_per_s"),
        "latency_ms": results["latency_ms"],
        "statuses": results["statuses"],
        "lost": results["lost"],
        "changes": changes,
        "acknowledged": acknowledged,
        "server_exit_code": exit_code,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux: /proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rounds: int, requests: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    runs: list[list[dict[str, Any]]] = []
    for round_ in range(rounds):
        order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
        pair: dict[str, dict[str, Any]] = {}
        for variant in order:
            db = tmp / f"outbox-{variant}-{round_}.db"
            run = run_one(variant, db, requests=requests, concurrency=concurrency, prefix=f"ob-{variant}-{round_}")
            pair[variant] = run
            print(
                f"round {round_ + 1}/{rounds} outbox {variant:>3}: {run['stored_messages_per_s'] or 0:,.0f} messages/s"
                f" stored, {run['cpu_us_per_message'] or 0:,.1f} CPU us/message, p99 "
                f"{(run['latency_ms'] or {}).get('p99', float('nan')):,.1f} ms, {run['changes']} changes",
                flush=True,
            )
        runs.append([pair["on"], pair["off"]])
    return summarise(runs)


def summarise(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    def rate(run: dict[str, Any]) -> float:
        return float(run["stored_messages_per_s"] or 0.0)

    on = [rate(on) for on, _ in runs]
    off = [rate(off) for _, off in runs]
    costs = [1 - a / b for a, b in zip(on, off, strict=True) if b]
    median_on, median_off = statistics.median(on), statistics.median(off)
    cpu_on = [float(on["cpu_us_per_message"] or 0.0) for on, _ in runs]
    cpu_off = [float(off["cpu_us_per_message"] or 0.0) for _, off in runs]
    cpu_costs = [a / b - 1 for a, b in zip(cpu_on, cpu_off, strict=True) if b]
    # Warm-up deliveries are stored too: one change per transcript stored, not per measured request.
    recorded = all(run["changes"] >= run["acknowledged"] for run, _ in runs)
    return {
        "rounds": [{"on": on_run, "off": off_run} for on_run, off_run in runs],
        "median_on_messages_per_s": median_on,
        "median_off_messages_per_s": median_off,
        "cost_of_medians": 1 - median_on / median_off if median_off else None,
        "cost_per_round": costs,
        "cost_spread": [min(costs), max(costs)] if costs else None,
        "median_on_cpu_us_per_message": statistics.median(cpu_on),
        "median_off_cpu_us_per_message": statistics.median(cpu_off),
        "cpu_cost_of_medians": statistics.median(cpu_on) / statistics.median(cpu_off) - 1
        if statistics.median(cpu_off)
        else None,
        "cpu_cost_spread": [min(cpu_costs), max(cpu_costs)] if cpu_costs else None,
        "lost_all_rounds": sum((r["lost"] or 0) for pair in runs for r in pair),
        "one_change_per_transcript": recorded,
        "off_recorded_nothing": all(off_run["changes"] == 0 for _, off_run in runs),
    }


def writer_alone(tmp: Path, *, per_commit: int, transcripts: int, rounds: int) -> dict[str, Any]:
    """The writer's own group commit without HTTP (``storage.writes.commit_batch``, ``synchronous = full``),
    on parsed Tavus transcripts in commits of ``per_commit``, recording on and off alternately: what the
    outbox adds to a commit, without the noise of a loaded event loop."""
    bodies = [encode(transcription_ready(f"wa-{i:06d}", turns=TURNS, seed=i)) for i in range(transcripts)]
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for variant in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            deliveries = [tavus.parse(body, {}, received_at=time.time())[0] for body in bodies]
            conn = open_writer(tmp / f"writer-{per_commit}-{variant}-{round_}.db")
            migrate(conn)
            started = time.perf_counter()
            for i in range(0, len(deliveries), per_commit):
                commit_batch(conn, deliveries[i : i + per_commit], record_changes=variant == "on")
            seconds[variant].append(time.perf_counter() - started)
            conn.close()
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    return {
        "per_commit": per_commit,
        "transcripts": transcripts,
        "seconds_on": seconds["on"],
        "seconds_off": seconds["off"],
        "ms_per_commit_on": 1000 * on / -(-transcripts // per_commit),
        "ms_per_commit_off": 1000 * off / -(-transcripts // per_commit),
        "cost": on / off - 1,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1600, help="transcripts per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--writer-transcripts", type=int, default=320, help="transcripts per writer-alone run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="transcriptd-outbox-") as tmp:
        figures = measure(args.rounds, args.requests, args.concurrency, Path(tmp))
        figures["writer_alone"] = [
            writer_alone(Path(tmp), per_commit=n, transcripts=args.writer_transcripts, rounds=args.rounds)
            for n in (2, 8, 32)
        ]
    for alone in figures["writer_alone"]:
        print(
            f"writer alone, commits of {alone['per_commit']}: {alone['ms_per_commit_on']:.2f} ms a commit with the "
            f"outbox, {alone['ms_per_commit_off']:.2f} without: {100 * alone['cost']:.1f}%"
        )
    report = {
        "settings": {
            "rounds": args.rounds,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "turns": TURNS,
            "content_chars": CONTENT_CHARS,
            "ack": "durable",
            "writer_transcripts": args.writer_transcripts,
        },
        "machine": describe(),
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    cost = figures["cost_of_medians"]
    spread = figures["cost_spread"]
    print(
        f"outbox cost at {args.concurrency} senders: {100 * cost:.1f}% of stored messages/s (medians of "
        f"{args.rounds} rounds; rounds {100 * spread[0]:.1f}% to {100 * spread[1]:.1f}%); wrote {args.output}"
        if cost is not None and spread
        else f"no figure: nothing was stored; wrote {args.output}"
    )
    if (cpu_cost := figures["cpu_cost_of_medians"]) is not None and (cpu_spread := figures["cpu_cost_spread"]):
        print(
            f"outbox cost in the daemon's CPU time per message stored: {100 * cpu_cost:.1f}% (medians; rounds "
            f"{100 * cpu_spread[0]:.1f}% to {100 * cpu_spread[1]:.1f}%)"
        )
    ok = figures["lost_all_rounds"] == 0 and figures["one_change_per_transcript"] and figures["off_recorded_nothing"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
