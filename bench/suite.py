"""``make bench``: every measurement behind BENCHMARKS.md, in one run, then the document itself.

    python -m bench.suite [--quick]

1. the write-up's claims, pairwise (``pytest bench/test_claims.py``, pytest-benchmark);
2. the invalidation sweep over cache sizes (``bench.invalidation``);
3. ingest against the storage limit, and what keeping raw bodies costs (``bench.ingest_limit``);
4. the read path, cached and not (``bench.read_path``);
5. the load comparison of transcriptd and the write-up's handlers (``bench.compare``);
6. what the transactional outbox costs durable ingest (``bench.outbox_cost``);
7. what the delivery log and the hardening cost durable ingest (``bench.overhead``);
8. the PostgreSQL server's ceiling beside the PostgreSQL group commit (``bench.pg_ceiling``; needs the
   server, and fails without it);
9. transcriptd serve on PostgreSQL, 1 and 2 replicas at 1, 16 and 64 senders, against COPY on the same
   server (``bench.pg_daemon``; needs the server too);
10. full-text search: its cost at ingest, and search latency over a million messages (``bench.search``);
11. BENCHMARKS.md and the chart from the results (``bench.report``).

Each step writes its JSON to ``bench/results/``. A step that fails stops the run (non-zero exit): a
document generated from a partial run would mix figures from different runs. ``--quick`` shrinks every
step, to check the pipeline, not to publish figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).parent.parent
DOCUMENT = REPO / "BENCHMARKS.md"


def steps(results: Path, document: Path, quick: bool) -> list[tuple[str, list[str]]]:
    def module(name: str, output: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", name, "--output", str(results / output), *extra]

    claims = [sys.executable, "-m", "pytest", "bench/test_claims.py", "-q"]
    claims += ["--benchmark-json", str(results / "claims.json"), "--benchmark-columns=median,iqr,rounds"]
    if quick:
        # One round each, and no slow extra round trip: the pipeline is what is checked.
        claims += ["--benchmark-disable", "--e2e-long-round-trip-ms", "0", "--e2e-webhooks", "4"]
    return [
        ("claims", claims),
        ("invalidation", module("bench.invalidation", "invalidation.json", *(["--sizes", "1000"] if quick else []))),
        (
            "ingest vs limit",
            module("bench.ingest_limit", "ingest_limit.json", *(["--webhooks", "64"] if quick else [])),
        ),
        (
            "read path",
            module(
                "bench.read_path", "read_path.json", *(["--requests", "200", "--conversations", "10"] if quick else [])
            ),
        ),
        # One executemany limit per run: the one ingest_limit measured.
        (
            "load comparison",
            module(
                "bench.compare",
                "load.json",
                "--limit-from",
                str(results / "ingest_limit.json"),
                *(["--scale", "0.05"] if quick else []),
            ),
        ),
        (
            "outbox cost",
            module(
                "bench.outbox_cost",
                "outbox_cost.json",
                *(["--rounds", "1", "--requests", "64", "--writer-transcripts", "32"] if quick else []),
            ),
        ),
        (
            "overhead",
            module(
                "bench.overhead",
                "overhead.json",
                *(["--rounds", "2", "--requests", "100", "--log-lines", "1000", "--no-instructions"] if quick else []),
            ),
        ),
        (
            "postgres ceiling",
            module("bench.pg_ceiling", "pg_ceiling.json", *(["--transcripts", "32", "--rounds", "1"] if quick else [])),
        ),
        (
            "postgres daemon",
            module(
                "bench.pg_daemon",
                "pg_daemon.json",
                *(
                    ["--requests", "16", "--per-sender", "1", "--single-requests", "4", "--copy-transcripts", "16"]
                    if quick
                    else []
                ),
            ),
        ),
        ("search", module("bench.search", "search.json", *(["--quick"] if quick else []))),
        ("report", [sys.executable, "-m", "bench.report", "--results", str(results), "--output", str(document)]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny runs: check the pipeline, not the figures")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default bench/results; --quick: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="transcriptd-bench-") as scratch:
        # A quick run must never overwrite the published figures.
        results = args.results or (Path(scratch) if args.quick else RESULTS)
        document = results / "BENCHMARKS.md" if args.quick or args.results else DOCUMENT
        results.mkdir(parents=True, exist_ok=True)
        return run(steps(results, document, args.quick), document)


def run(plan: list[tuple[str, list[str]]], document: Path) -> int:
    started = time.perf_counter()
    timings: list[str] = []
    for name, argv in plan:
        print(f"\n== {name}: {' '.join(argv[1:])}", flush=True)
        step_started = time.perf_counter()
        code = subprocess.call(argv, cwd=REPO)
        timings.append(f"{name} {time.perf_counter() - step_started:.0f} s")
        if code != 0:
            print(f"\n{name} failed (exit {code}): stopping", file=sys.stderr)
            return code
    print(f"\nmake bench: {time.perf_counter() - started:.0f} s ({', '.join(timings)}); {document}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
