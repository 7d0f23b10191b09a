"""Daemon ingest against the storage limit, measured side by side in one run.

The limit: a plain ``sqlite3`` ``executemany`` loop inserting the same message rows into the same schema
(migrated the same way, same pragmas), committing as often as the daemon would with as many senders.
The daemon: a real ``transcriptd serve`` process, fed 100-message Tavus webhooks over loopback by
concurrent senders; messages/s counts rows found in the database afterwards, over the wall time.

    python -m bench.ingest_limit [--webhooks 1600] [--concurrency 16] [--turns 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.machine import describe
from bench.payloads import encode, transcription_ready
from bench.processes import start_transcriptd, stop
from bench.rawhttp import closed_loop
from daemon.sources import tavus
from daemon.sources.tavus import TranscriptionReady
from storage.connection import open_writer
from storage.deliveries import MESSAGE_COLUMNS
from storage.migrations import migrate
from storage.statements import INSERT_MESSAGES, INSERT_MESSAGES_TAIL, multi_row
from storage.writes import write_batch

RESULTS = Path(__file__).parent / "results"
WEBHOOK = "/webhooks/tavus"


def make_bodies(count: int, turns: int) -> list[bytes]:
    return [encode(transcription_ready(f"bench-{i:06d}", turns=turns, seed=i)) for i in range(count)]


def rows_of(body: bytes) -> list[tuple[Any, ...]]:
    """The exact rows the daemon stores for one body, decoded outside the timed loop."""
    envelope = msgspec.json.decode(body)
    entries = msgspec.convert(envelope["properties"], TranscriptionReady).transcript
    now = time.time()
    cid = envelope["conversation_id"]
    return [
        (
            cid,
            "tavus",
            i,
            e.role,
            e.content or "",
            e.timestamp,
            e.seconds_from_start,
            e.duration,
            e.inference_id,
            None,
            now,
        )
        for i, e in enumerate(entries)
    ]


def executemany_limit(db: Path, bodies: list[bytes], per_commit: int, synchronous: str) -> dict[str, float]:
    transcripts = [rows_of(b) for b in bodies]
    conn = open_writer(db, synchronous=synchronous)  # type: ignore[arg-type]
    migrate(conn)
    # The schema's foreign key needs the conversation rows; they are not part of the timed loop.
    conn.executemany(
        "INSERT INTO conversations (id, source, created_at, updated_at) VALUES (?, 'bench', 0, 0)",
        [(t[0][0],) for t in transcripts],
    )
    insert = multi_row(
        INSERT_MESSAGES, len(MESSAGE_COLUMNS), 1, INSERT_MESSAGES_TAIL
    )  # the daemon's columns and conflict rule, one row
    started = time.perf_counter()
    for i in range(0, len(transcripts), per_commit):
        conn.execute("BEGIN IMMEDIATE")
        for rows in transcripts[i : i + per_commit]:
            conn.executemany(insert, rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    return {"rows": stored, "seconds": elapsed, "rows_per_s": stored / elapsed}


def writer_alone(db: Path, bodies: list[bytes], per_commit: int, synchronous: str, raw: bool) -> dict[str, float]:
    """The daemon's own group commit, without HTTP: parsed deliveries in batches of ``per_commit``.
    With ``raw=False`` the events rows get empty bodies: the difference is what keeping them costs."""
    deliveries = [tavus.parse(b, {}, received_at=time.time())[0] for b in bodies]
    if not raw:
        deliveries = [msgspec.structs.replace(delivery, body=b"") for delivery in deliveries]
    conn = open_writer(db, synchronous=synchronous)  # type: ignore[arg-type]
    migrate(conn)
    started = time.perf_counter()
    for i in range(0, len(deliveries), per_commit):
        write_batch(conn, deliveries[i : i + per_commit])
    elapsed = time.perf_counter() - started
    stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    return {"rows": stored, "seconds": elapsed, "rows_per_s": stored / elapsed}


async def drive(port: int, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    return await closed_loop(port, bodies, concurrency, lambda connection, body: connection.post(WEBHOOK, body))


def daemon_ingest(db: Path, bodies: list[bytes], concurrency: int, ack: str, synchronous: str) -> dict[str, Any]:
    process, port = start_transcriptd(db, ack=ack, synchronous=synchronous)
    # The warm-up bodies are the first ``concurrency`` conversation ids.
    measured = "SELECT count(*) FROM messages WHERE conversation_id >= ?", (f"bench-{concurrency:06d}",)
    # Counted before the clock starts: decoding every body again is not the daemon's time.
    expected = sum(len(rows_of(b)) for b in bodies[concurrency:])
    try:
        asyncio.run(drive(port, bodies[:concurrency], concurrency))  # warm-up: connections, first actors
        started = time.perf_counter()
        run = asyncio.run(drive(port, bodies[concurrency:], concurrency))
        conn = sqlite3.connect(db)
        # An enqueued ack comes before the commit: the clock stops when the rows are all in the database.
        while conn.execute(*measured).fetchone()[0] < expected and time.perf_counter() - started < 120:
            time.sleep(0.002)
        run["seconds_until_stored"] = time.perf_counter() - started
        conn.close()
    finally:
        stop(process)
    conn = sqlite3.connect(db)
    (run["rows"],) = conn.execute(*measured).fetchone()
    conn.close()
    run["rows_per_s"] = run["rows"] / max(run["seconds"], run["seconds_until_stored"])
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=1600, help="transcripts to send (default 1600)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent senders (default 16)")
    parser.add_argument("--turns", type=int, default=100, help="messages per transcript besides the system one")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument("--ack", choices=["durable", "enqueued"], default="durable")
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest_limit.json")
    args = parser.parse_args(argv)

    bodies = make_bodies(args.webhooks + args.concurrency, args.turns)
    with tempfile.TemporaryDirectory() as tmp:
        measured = bodies[args.concurrency :]
        limit = executemany_limit(Path(tmp) / "limit.db", measured, args.concurrency, args.synchronous)
        alone = writer_alone(Path(tmp) / "alone.db", measured, args.concurrency, args.synchronous, raw=True)
        no_raw = writer_alone(Path(tmp) / "noraw.db", measured, args.concurrency, args.synchronous, raw=False)
        daemon = daemon_ingest(Path(tmp) / "daemon.db", bodies, args.concurrency, args.ack, args.synchronous)
        single = daemon_ingest(Path(tmp) / "single.db", bodies[: min(len(bodies), 301)], 1, args.ack, args.synchronous)
    report = {
        "machine": describe(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "output"},  # no local paths in results
        "body_bytes_mean": round(statistics.fmean(len(b) for b in bodies)),
        "executemany_limit": limit,
        "writer_alone": alone,
        "writer_alone_without_raw_bodies": no_raw,
        "daemon": daemon,
        "daemon_single_sender": single,
        "daemon_vs_limit": round(daemon["rows_per_s"] / limit["rows_per_s"], 3),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"executemany limit: {limit['rows_per_s']:,.0f} rows/s | "
        f"daemon ({args.ack}, synchronous={args.synchronous}, {args.concurrency} senders): "
        f"{daemon['rows_per_s']:,.0f} messages/s = {report['daemon_vs_limit']:.0%} of the limit, "
        f"ack p50 {daemon['latency_ms']['p50']} ms p99 {daemon['latency_ms']['p99']} ms | "
        f"1 sender: ack p50 {single['latency_ms']['p50']} ms p99 {single['latency_ms']['p99']} ms"
    )
    print(
        f"writer alone (no HTTP, batches of {args.concurrency}): {alone['rows_per_s']:,.0f} rows/s with raw bodies, "
        f"{no_raw['rows_per_s']:,.0f} without: keeping them costs {1 - alone['rows_per_s'] / no_raw['rows_per_s']:.0%}"
    )
    print(f"statuses: {daemon['statuses']} / {single['statuses']}; written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
