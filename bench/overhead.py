"""What the delivery log and the hardening cost durable ingest, side by side in one run.

    python -m bench.overhead [--rounds 10] [--requests 1000] [--concurrency 16] [--before c8aee86]
                             [--no-instructions] [--output PATH]

Three daemons serve at once, each on its own database, with ``ingest.ack = "durable"`` and their output to
/dev/null:

- ``log-on``: this code on its defaults (one info line per delivery);
- ``log-off``: this code with ``logging.deliveries = false``;

both with the outbox and the search index off (``changes.enabled``, ``search.enabled``): each of those has
its own step, with and without it (``bench.outbox_cost``, ``bench.search``), and here they would hide what
the comparison with ``before`` is about;

- ``before``: the code of commit ``--before`` (c8aee86: before the hardening of the HTTP server, the memory
  budget, the id checks, and the delivery log), taken out of this repository with ``git archive`` into a
  temporary directory and run with this interpreter and its packages. Without that commit (a shallow clone)
  the comparison is skipped and the results say so.

Each round sends ``--requests`` 100-message Tavus transcripts from ``--concurrency`` closed-loop senders
(``bench.load``) to each daemon in turn, the order rotated every round so no daemon always goes first or
follows the same one; the machine's load drifts, and a drift lands on every daemon alike. Per daemon and
round: its throughput (messages/s), and its own CPU time (user and system, all threads, from /proc) per
webhook, which moves far less than the throughput when other processes share the cores. Per daemon: the
median of its rounds and their spread (interquartile range over the median). A comparison gives the ratio of
the medians and the ratios of the rounds paired in time, and says whether the difference is within the
run's own noise: no larger than the wider spread of the two daemons.

The log line's own cost, per line, comes first: ``bench.log_line`` (time, and instructions under callgrind).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import load
from bench.log_line import FORMATS, instructions_per_line
from bench.machine import describe
from bench.processes import REPO, start_transcriptd, stop

RESULTS = Path(__file__).parent / "results"
BEFORE = "c8aee86"
ROUNDS = 10
REQUESTS = 1000
CONCURRENCY = 16
WARMUP = 200
TURNS = 100
LOG_LINES = 20_000
TICKS = os.sysconf("SC_CLK_TCK")
# (name, what it shows, the first daemon, the second): the ratio is the first's throughput over the second's.
COMPARISONS = (
    ("log", "the delivery log on vs off", "log-on", "log-off"),
    ("hardening", "this code vs the code before the hardening", "log-on", "before"),
    ("hardening-without-log", "this code, the delivery log off, vs the code before the hardening", "log-off", "before"),
)


@dataclass(slots=True)
class Daemon:
    key: str
    label: str
    root: Path
    env: dict[str, str]
    rates: list[float] = field(default_factory=list)  # messages/s, by round
    cpu_ms: list[float] = field(default_factory=list)  # the daemon's CPU time per webhook, by round
    statuses: dict[str, int] = field(default_factory=dict)


ON_LABEL = "this code (outbox and search index off), delivery log on (the default)"
OFF_LABEL = "this code (outbox and search index off), delivery log off"


def source_tree(commit: str, into: Path) -> str | None:
    """The files of ``commit`` under ``into``; the full commit id, or None when the repository (or git) lacks it."""
    git = shutil.which("git")
    if git is None:
        return None
    found = subprocess.run(
        [git, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True, text=True
    )
    if found.returncode != 0:
        return None
    archive = subprocess.Popen([git, "archive", "--format=tar", commit], cwd=REPO, stdout=subprocess.PIPE)
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(into, filter="data")
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed with {archive.returncode}")
    return found.stdout.strip()


def imported_from(root: Path) -> Path:
    """Where ``import daemon`` resolves when run as the daemon is run from ``root``: checks that an older tree
    is what runs, not the package installed in the environment."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-c", "import daemon; print(daemon.__file__)"]
    printed = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    return Path(printed.strip()).resolve()


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) of process ``pid`` and all its threads, those that ended included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime and stime, fields 14 and 15 of proc(5)


def spread(values: Sequence[float]) -> float:
    """The interquartile range over the median (0 with fewer than two values)."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def summary(daemon: Daemon) -> dict[str, Any]:
    rates = daemon.rates
    return {
        "label": daemon.label,
        "messages_per_s": [round(rate) for rate in rates],
        "median": round(statistics.median(rates)),
        "min": round(min(rates)),
        "max": round(max(rates)),
        "spread": round(spread(rates), 4),
        "cpu_ms_per_webhook": [round(ms, 4) for ms in daemon.cpu_ms],
        "cpu_median": round(statistics.median(daemon.cpu_ms), 4),
        "cpu_spread": round(spread(daemon.cpu_ms), 4),
        "statuses": daemon.statuses,
    }


def compare(first: Daemon, second: Daemon) -> dict[str, Any]:
    """The first daemon's throughput over the second's, and its CPU time per webhook over the second's."""
    return {**_ratios(first.rates, second.rates), "cpu": _ratios(first.cpu_ms, second.cpu_ms)}


def _ratios(first: list[float], second: list[float]) -> dict[str, Any]:
    ratio = statistics.median(first) / statistics.median(second)
    paired = [a / b for a, b in zip(first, second, strict=True)]
    noise = max(spread(first), spread(second))
    return {
        "ratio": round(ratio, 4),
        "paired_ratios": [round(r, 4) for r in paired],
        "paired_median": round(statistics.median(paired), 4),
        "noise": round(noise, 4),
        "within_noise": abs(ratio - 1) <= noise,
    }


def drive(daemons: list[Daemon], rounds: int, requests: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="transcriptd-overhead-") as scratch:
        running = []
        try:
            for daemon in daemons:
                env = {**daemon.env, "TRANSCRIPTD_STORAGE_SYNCHRONOUS": "full"}
                running.append(start_transcriptd(Path(scratch) / f"{daemon.key}.db", env=env, root=daemon.root))
            urls = [f"http://127.0.0.1:{port}" for _, port in running]
            for daemon, url in zip(daemons, urls, strict=True):
                warm = load(url, concurrency=concurrency, requests=WARMUP, turns=TURNS, id_prefix=f"{daemon.key}-warm")
                _check(daemon, warm, keep=False)
            for round_ in range(rounds):
                # Rotated: each daemon takes each place in the order in turn.
                order = list(range(len(daemons)))
                order = order[round_ % len(order) :] + order[: round_ % len(order)]
                for index in order:
                    daemon = daemons[index]
                    pid = running[index][0].pid
                    cpu_before = cpu_seconds(pid)
                    report = load(
                        urls[index],
                        concurrency=concurrency,
                        requests=requests,
                        turns=TURNS,
                        id_prefix=f"{daemon.key}-r{round_}",
                    )
                    _check(daemon, report, keep=True)
                    daemon.cpu_ms.append((cpu_seconds(pid) - cpu_before) * 1000 / requests)
                line = ", ".join(f"{d.key} {d.rates[-1]:,.0f} ({d.cpu_ms[-1]:.3f} ms)" for d in daemons)
                print(f"round {round_ + 1}/{rounds}, messages/s (daemon CPU per webhook): {line}", flush=True)
        finally:
            codes = [stop(process) for process, _ in running]
        if any(codes):
            raise RuntimeError(f"a daemon exited with {codes} on SIGTERM")


def _check(daemon: Daemon, report: dict[str, Any], *, keep: bool) -> None:
    results = report["results"]
    if results["ok"] != results["sent"] or results["errors"]["total"]:
        raise RuntimeError(f"{daemon.key}: not every request was stored: {results['statuses']} {results['errors']}")
    if keep:
        daemon.rates.append(results["throughput"]["ack"]["messages_per_s"])
        for status, count in results["statuses"].items():
            daemon.statuses[status] = daemon.statuses.get(status, 0) + count


def line_cost(lines: int, instructions: bool) -> dict[str, dict[str, Any]]:
    # Each format in a process of its own: configure() sets the process's logging once.
    cost: dict[str, dict[str, Any]] = {}
    for fmt in FORMATS:
        argv = [
            sys.executable,
            "-c",
            f"from bench.log_line import microseconds_per_line as m; print(m({fmt!r}, {lines}))",
        ]
        timed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True)
        cost[fmt] = {
            "us_per_line": float(timed.stdout.strip()),
            "instructions_per_line": instructions_per_line(fmt) if instructions else None,
        }
    return cost


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per daemon and round")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--before", default=BEFORE, help="the commit before the hardening")
    parser.add_argument("--log-lines", type=int, default=LOG_LINES, help="lines per timed batch of bench.log_line")
    parser.add_argument("--no-instructions", action="store_true", help="skip the instruction counts (callgrind)")
    parser.add_argument("--output", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")

    line = line_cost(args.log_lines, not args.no_instructions)
    for fmt, cost in line.items():
        counted = f", {cost['instructions_per_line']:,} instructions" if cost["instructions_per_line"] else ""
        print(f"a delivery's log line, {fmt}: {cost['us_per_line']} us{counted}")

    later = {"TRANSCRIPTD_CHANGES_ENABLED": "false", "TRANSCRIPTD_SEARCH_ENABLED": "false"}  # see the docstring
    daemons = [
        Daemon("log-on", ON_LABEL, REPO, later),
        Daemon("log-off", OFF_LABEL, REPO, {**later, "TRANSCRIPTD_LOGGING_DELIVERIES": "false"}),
    ]
    with tempfile.TemporaryDirectory(prefix="transcriptd-before-") as tree:
        commit = source_tree(args.before, Path(tree))
        skipped = None
        if commit is None:
            skipped = f"commit {args.before} is not in this repository (a shallow clone?): no comparison with it"
            print(skipped)
        else:
            runs = imported_from(Path(tree))
            if not runs.is_relative_to(Path(tree).resolve()):
                raise RuntimeError(f"the code of {args.before} would not run: daemon is imported from {runs}")
            daemons.append(Daemon("before", f"before the hardening ({commit[:7]})", Path(tree), {}))
        drive(daemons, args.rounds, args.requests, args.concurrency)

    by_key = {daemon.key: daemon for daemon in daemons}
    comparisons = {
        name: {"what": what, "first": first, "second": second, **compare(by_key[first], by_key[second])}
        for name, what, first, second in COMPARISONS
        if first in by_key and second in by_key
    }
    report: dict[str, Any] = {
        "machine": describe(),
        "settings": {
            "rounds": args.rounds,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "turns": TURNS,
            "ack": "durable",
            "synchronous": "full",
            "before": args.before,
            "before_commit": commit,
        },
        "skipped": skipped,
        "log_line": line,
        "daemons": {daemon.key: summary(daemon) for daemon in daemons},
        "comparisons": comparisons,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for key, daemon in report["daemons"].items():
        print(
            f"{key:8s}: median {daemon['median']:,} messages/s ({daemon['min']:,}-{daemon['max']:,}), "
            f"spread {daemon['spread']:.1%}; CPU {daemon['cpu_median']:.3f} ms per webhook, spread "
            f"{daemon['cpu_spread']:.1%}"
        )
    for name, c in comparisons.items():
        verdict = "within" if c["within_noise"] else "outside"
        print(f"{name}: {c['first']}/{c['second']} = {c['ratio']:.3f} ({verdict} the noise, {c['noise']:.1%})")
        cpu = c["cpu"]
        verdict = "within" if cpu["within_noise"] else "outside"
        print(f"  CPU per webhook: {cpu['ratio']:.3f} ({verdict} the noise, {cpu['noise']:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
