"""``make bench``: every measurement behind BENCHMARKS.md, in one run, then the document itself.

    python -m bench.suite [--quick]

1. the write-up's claims, pairwise (``pytest bench/test_claims.py``, pytest-benchmark);
2. the invalidation sweep over cache sizes (``bench.invalidation``);
3. ingest against the storage limit, and what keeping raw bodies costs (``bench.ingest_limit``);
4. the read path, cached and not (``bench.read_path``);
5. the load comparison of transcriptd and the write-up's handlers (``bench.compare``);
6. BENCHMARKS.md and the chart from the results (``bench.report``).

Each step writes its JSON to ``bench/results/``. A step that fails stops the run (non-zero exit): a
document generated from a partial run would mix figures from different runs. ``--quick`` shrinks every
step, to check the pipeline, not to publish figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).parent.parent


def steps(quick: bool) -> list[tuple[str, list[str]]]:
    python = [sys.executable]
    claims = ["-m", "pytest", "bench/test_claims.py", "-q"]
    claims += ["--benchmark-json", str(RESULTS / "claims.json"), "--benchmark-columns=median,iqr,rounds"]
    if quick:
        claims += ["--benchmark-disable"]
    return [
        ("claims", python + claims),
        ("invalidation", [*python, "-m", "bench.invalidation", *(["--sizes", "1000,10000"] if quick else [])]),
        ("ingest vs limit", [*python, "-m", "bench.ingest_limit", *(["--webhooks", "160"] if quick else [])]),
        (
            "read path",
            [*python, "-m", "bench.read_path", *(["--requests", "500", "--conversations", "20"] if quick else [])],
        ),
        ("load comparison", [*python, "-m", "bench.compare", *(["--scale", "0.1"] if quick else [])]),
        ("report", [*python, "-m", "bench.report"]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny runs: check the pipeline, not the figures")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    timings: list[str] = []
    for name, argv_ in steps(args.quick):
        print(f"\n== {name}: {' '.join(argv_[1:])}", flush=True)
        step_started = time.perf_counter()
        code = subprocess.call(argv_, cwd=REPO)
        timings.append(f"{name} {time.perf_counter() - step_started:.0f} s")
        if code != 0:
            print(f"\n{name} failed (exit {code}): stopping", file=sys.stderr)
            return code
    print(f"\nmake bench: {time.perf_counter() - started:.0f} s ({', '.join(timings)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
