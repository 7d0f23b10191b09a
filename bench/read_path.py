"""The read path, measured side by side in one run.

- ``GET /conversations/{id}/messages`` against a running daemon, with the cache warm (every page read
  before) and with the cache defeated (a TTL of a microsecond: every read goes to SQLite): requests/s
  and latency percentiles at a set concurrency.

Eviction by prefix against a scan of every key is ``bench.invalidation``'s, at 1,000 to 1,000,000 keys.

    python -m bench.read_path [--conversations 200] [--requests 20000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from bench.ingest_limit import RESULTS, WEBHOOK
from bench.machine import describe
from bench.payloads import encode, transcription_ready
from bench.processes import start_transcriptd, stop
from bench.rawhttp import Connection, closed_loop


async def load(port: int, conversations: int) -> None:
    connection = Connection("127.0.0.1", port)
    for i in range(conversations):
        answer = await connection.post(WEBHOOK, encode(transcription_ready(f"read-{i:05d}", seed=i)))
        assert answer.status == 200, answer.body
    await connection.close()


async def read(port: int, urls: list[str], concurrency: int) -> dict[str, Any]:
    run = await closed_loop(port, urls, concurrency, lambda connection, url: connection.get(url))
    run["requests_per_s"] = len(urls) / run["seconds"]
    return run


def serve_and_read(db: Path, urls: list[str], concurrency: int, ttl_s: float) -> dict[str, Any]:
    cache = {"TRANSCRIPTD_CACHE_TTL_S": str(ttl_s), "TRANSCRIPTD_CACHE_MAX_ENTRIES": str(len(set(urls)) * 2)}
    process, port = start_transcriptd(db, env=cache)
    try:
        asyncio.run(read(port, sorted(set(urls)), concurrency))  # warm: every page once
        return asyncio.run(read(port, urls, concurrency))
    finally:
        stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output", type=Path, default=RESULTS / "read_path.json")
    args = parser.parse_args(argv)

    rng = random.Random(7)
    urls = [
        f"/conversations/read-{rng.randrange(args.conversations):05d}/messages?page={rng.randint(1, 2)}&limit=50"
        for _ in range(args.requests)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "read.db"
        process, port = start_transcriptd(db)
        try:
            asyncio.run(load(port, args.conversations))
        finally:
            stop(process)
        cached = serve_and_read(db, urls, args.concurrency, ttl_s=3600)
        uncached = serve_and_read(db, urls, args.concurrency, ttl_s=1e-6)
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    report = {
        "machine": describe(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "output"},  # no local paths in results
        "messages_stored": stored,
        "cached": cached,
        "uncached": uncached,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, run in (("cached", cached), ("uncached", uncached)):
        lat = run["latency_ms"]
        print(
            f"GET messages, {name:8s}: {run['requests_per_s']:8,.0f} req/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms "
            f"({args.concurrency} readers; statuses {run['statuses']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
