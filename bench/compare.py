"""The load comparison: transcriptd and the write-up's handler, served alike, driven alike, in one run.

    python -m bench.compare [--concurrency 1,16,64] [--scale 1.0] [--round-trip-ms 1] [--rounds 3] [--output PATH]

Each system runs as its own server process on a fresh database and takes the same closed-loop load from
``bench.load`` (100-message Tavus transcripts, one conversation each) at each concurrency; every
acknowledged message is then looked for in the database. Each system runs ``--rounds`` times at each
concurrency, each round on a fresh process and database, and the run with the median ack p99 is kept
(every round is summarised in the JSON, and a loss in any round is counted). The systems:

- transcriptd, ``ingest.ack = "durable"`` (200 once committed with ``synchronous = full``) and
  ``"enqueued"`` (202 once in memory);
- the write-up's "before" handler (answers once everything is stored) and its "after" handler (202 at
  once, then bulk insert in the background), on the same storage engine, schema, pragmas and uvicorn;
  with the write-up's Redis cache when one answers on loopback;
- the same two with a simulated database round trip per statement (``--round-trip-ms``), at the highest
  concurrency only: the write-up's database was across a network, and a round trip costs what it costs.

In the same run, a plain ``sqlite3`` ``executemany`` loop inserts the same rows into the same schema:
the storage limit every figure is set against.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from bench.ingest_limit import executemany_limit
from bench.load import Workload, body_templates, conversation_ids, load
from bench.machine import describe
from bench.naive import Variant
from bench.processes import start_transcriptd, stop
from bench.redis_cache import DEFAULT_URL, check_redis_url, redis_available
from bench.roundtrip import DEFAULT_ROUND_TRIP_MS
from bench.serve_naive import start_naive

RESULTS = Path(__file__).parent / "results"
CONCURRENCIES = (1, 16, 64)
# The machine is shared and noisy: a tail percentile from one run moves by several ms from run to run.
# Each system runs this many times per concurrency; the table keeps the run with the median ack p99.
ROUNDS = 3
TURNS = 100
CONTENT_CHARS = 200
# Per-request cost differs 100-fold between the systems; each run is sized to last a few seconds.
REQUESTS_PER_SENDER = {"fast": 50, "slow": 10}
MIN_REQUESTS = {"fast": 600, "slow": 60}


@dataclass(frozen=True, slots=True)
class System:
    key: str
    label: str
    speed: str  # "fast" or "slow": how many requests make a run of a few seconds
    start: Callable[[Path], tuple[subprocess.Popen[bytes], int]]
    round_trip_ms: float = 0.0
    highest_concurrency_only: bool = False


def systems(round_trip_ms: float, cache: str, redis_url: str) -> list[System]:
    def naive(variant: Variant, rt: float) -> Callable[[Path], tuple[subprocess.Popen[bytes], int]]:
        return lambda db: start_naive(
            db,
            variant,
            round_trip_ms=rt,
            cache=cache,
            redis_url=redis_url,
            tune_gc=True,
            log=subprocess.DEVNULL,
        )

    rt = f"{round_trip_ms:g} ms round trip"
    return [
        System("transcriptd-durable", "transcriptd durable", "fast", lambda db: start_transcriptd(db, ack="durable")),
        System(
            "transcriptd-enqueued", "transcriptd enqueued", "fast", lambda db: start_transcriptd(db, ack="enqueued")
        ),
        System("naive-before", "write-up before", "slow", naive("before", 0.0)),
        System("naive-after", "write-up after", "fast", naive("after", 0.0)),
        System(
            "naive-before-rt", f"write-up before, {rt}", "slow", naive("before", round_trip_ms), round_trip_ms, True
        ),
        System("naive-after-rt", f"write-up after, {rt}", "slow", naive("after", round_trip_ms), round_trip_ms, True),
    ]


def request_count(system: System, concurrency: int, scale: float) -> int:
    wanted = max(MIN_REQUESTS[system.speed], REQUESTS_PER_SENDER[system.speed] * concurrency)
    if system.round_trip_ms:
        wanted = max(concurrency, wanted // 4)  # ~100 round trips a request: a few seconds at 64
    return max(concurrency, round(wanted * scale))


def run_one(system: System, concurrency: int, scale: float, tmp: Path, round_: int = 0) -> dict[str, Any]:
    db = tmp / f"{system.key}-{concurrency}-{round_}.db"
    process, port = system.start(db)
    try:
        report = load(
            f"http://127.0.0.1:{port}",
            concurrency=concurrency,
            requests=request_count(system, concurrency, scale),
            turns=TURNS,
            content_chars=CONTENT_CHARS,
            verify_db=db,
            verify_timeout_s=120.0,
            id_prefix=f"{system.key}-c{concurrency}-r{round_}",
            warmup=concurrency,
        )
    finally:
        exit_code = stop(process)
    results = report["results"]
    results["server_exit_code"] = exit_code
    settings = {k: v for k, v in report["settings"].items() if k not in ("url", "verify_db")}  # local details
    return {
        "system": system.key,
        "label": system.label,
        "round_trip_ms": system.round_trip_ms,
        "concurrency": concurrency,
        "settings": settings,
        "results": results,
    }


def median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median ack p99 (a run that got no answer counts as the slowest), with every
    round summarised beside it: the table shows one whole run, not figures picked from several, and a
    message lost in any round is counted (``lost_all_rounds``)."""
    p99s = [((r["results"]["latency_ms"] or {}).get("p99", math.inf), i) for i, r in enumerate(rounds)]
    chosen = dict(rounds[sorted(p99s)[len(p99s) // 2][1]])
    chosen["rounds"] = [
        {
            "stored_messages_per_s": (r["results"]["throughput"]["stored"] or {}).get("messages_per_s"),
            "latency_ms": r["results"]["latency_ms"],
            "statuses": r["results"]["statuses"],
            "lost": r["results"]["lost"],
        }
        for r in rounds
    ]
    chosen["lost_all_rounds"] = sum(r["results"]["lost"] or 0 for r in rounds)
    return chosen


def storage_limit(tmp: Path, per_commit: int) -> dict[str, float]:
    """The plain executemany loop over the rows of the same bodies the load sends."""
    workload = Workload.prepare(conversation_ids("limit", 1600), body_templates(TURNS, CONTENT_CHARS, 0))
    bodies = [workload.body(i) for i in range(len(workload.ids))]
    return executemany_limit(tmp / "limit.db", bodies, per_commit, "full")


async def flush(redis_url: str) -> None:
    """Each system starts on an empty cache: ``KEYS`` must not walk what an earlier run left."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def run(
    concurrencies: Sequence[int],
    scale: float,
    round_trip_ms: float,
    redis_url: str,
    limit: dict[str, float] | None = None,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    """``limit``: the executemany limit already measured in this run (``bench.ingest_limit``), or None to
    measure it here. ``rounds``: runs per system and concurrency (a system behind a simulated round trip
    runs once: tens of seconds a run)."""
    check_redis_url(redis_url)  # the runs empty it: never database 0
    redis_skipped = anyio.run(redis_available, redis_url)
    cache = "memory" if redis_skipped else "redis"
    if redis_skipped:
        print(f"the write-up's handlers use an in-process dict for their cache: {redis_skipped}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transcriptd-compare-") as tmp_name:
        tmp = Path(tmp_name)
        limit = limit or storage_limit(tmp, per_commit=16)
        print(f"executemany limit: {limit['rows_per_s']:,.0f} rows/s", file=sys.stderr)
        for system in systems(round_trip_ms, cache, redis_url):
            for concurrency in concurrencies:
                if system.highest_concurrency_only and concurrency != max(concurrencies):
                    continue
                attempts = []
                for round_ in range(1 if system.round_trip_ms else rounds):
                    if not redis_skipped:
                        anyio.run(flush, redis_url)
                    attempts.append(run_one(system, concurrency, scale, tmp, round_))
                    r = attempts[-1]["results"]
                    stored = (r["throughput"]["stored"] or {}).get("messages_per_s")
                    latency = r["latency_ms"] or {}
                    print(
                        f"{system.label:>34} c={concurrency:<3} stored {stored or 0:>9,.0f} msgs/s  "
                        f"ack p50 {latency.get('p50', '-'):>8} p99 {latency.get('p99', '-'):>8} ms  "
                        f"statuses {r['statuses']} lost {r['lost']}",
                        file=sys.stderr,
                    )
                runs.append(median_run(attempts))
    return {
        "machine": describe(),
        "settings": {
            "concurrencies": list(concurrencies),
            "scale": scale,
            "round_trip_ms": round_trip_ms,
            "turns": TURNS,
            "content_chars": CONTENT_CHARS,
            "naive_cache": cache,
            "redis_skipped": redis_skipped,
            "rounds": rounds,
        },
        "executemany_limit": limit,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)), help="comma-separated")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's request count")
    parser.add_argument("--round-trip-ms", type=float, default=DEFAULT_ROUND_TRIP_MS)
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="runs per system and concurrency; the median is kept"
    )
    parser.add_argument("--redis-url", default=DEFAULT_URL)
    parser.add_argument("--output", type=Path, default=RESULTS / "load.json")
    parser.add_argument(
        "--limit-from",
        type=Path,
        metavar="JSON",
        help="take the executemany limit from bench.ingest_limit's results of this run instead of measuring it again",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    limit = json.loads(args.limit_from.read_text())["executemany_limit"] if args.limit_from else None
    report = run(concurrencies, args.scale, args.round_trip_ms, args.redis_url, limit, args.rounds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output} in {report['seconds']} s", file=sys.stderr)
    lost = sum(run["lost_all_rounds"] for run in report["runs"])
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
