"""transcriptd on PostgreSQL: real ``transcriptd serve`` replicas sharing one fresh database, against COPY on
the same server in the same run.

For 1 and then 2 replicas (``serve --db postgresql://...``, ack durable, ``storage.synchronous = full``,
started on one fresh database and left running for the replica count's runs), closed loops of 1, 16 and 64
senders POST 100-message Tavus transcripts, each conversation its own. The load is split across the
replicas as a round-robin balancer would: each sender keeps a connection to every replica and sends its
requests to them in turn. Per run:

- messages/s: the messages of the 200 answers over the time until the last answer (durable: a 200 is
  committed);
- ack p50/p95/p99 as the senders saw them;
- commits/s and message rows per commit, from the replicas' own ``/metrics``
  (``transcriptd_commit_duration_seconds_count``, ``transcriptd_commit_rows_sum``), before and after;
- lost: conversations answered 200 without all their rows in the database, checked in PostgreSQL after
  the run (the step fails unless it is 0);
- the share of COPY: binary ``COPY messages FROM STDIN`` of the same kind of rows, 16 transcripts per
  commit, into the same table of the same database, timed just before and just after the run (while the
  replicas idle); the run is divided by the mean of the two, so a server whose speed drifts during the
  step drifts for both alike.

    python -m bench.pg_daemon [--url postgresql://postgres@127.0.0.1:5432/postgres] [--senders 1 16 64]
                              [--replicas 1 2] [--requests 400] [--per-sender 8] [--single-requests 80]

An unreachable server fails the step. ``BENCH_PROFILE=DIR`` runs every replica under cProfile,
its profile written to DIR/<port>.prof when it stops (what limits a run, without another tool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.load import Workload, body_templates, conversation_ids, messages_in
from bench.machine import describe
from bench.pg_ceiling import DEFAULT_URL, copy_messages, scratch_database, server_version
from bench.processes import HOST, free_port, start_server, start_transcriptd, stop
from bench.rawhttp import Connection as HttpConnection
from bench.rawhttp import percentiles
from daemon.sources import tavus
from storage.postgres.connection import Connection, connect

RESULTS = Path(__file__).parent / "results"
WEBHOOK = "/webhooks/tavus"
PER_COMMIT = 16  # COPY's transcripts per commit, as bench.pg_ceiling commits them
COPY_TRANSCRIPTS = 96
PROFILE = "BENCH_PROFILE"
# The claim this step checks: durable ingest through two replicas at 16 senders.
CLAIM = {"replicas": 2, "senders": 16, "at_least": 0.3, "goal": 0.5}


# --- the replicas ---------------------------------------------------------------------------------------


@contextmanager
def replicas(url: str, count: int) -> Iterator[list[int]]:
    """``count`` ``transcriptd serve`` processes on ``url``, durable and synchronous full: their ports."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            process, port = start_replica(url)
            stack.callback(stop, process)
            ports.append(port)
        yield ports


def start_replica(url: str) -> tuple[subprocess.Popen[bytes], int]:
    directory = os.environ.get(PROFILE)
    if not directory:
        return start_transcriptd(url, ack="durable", synchronous="full")
    # cProfile writes its file when the process exits normally: stop() sends SIGTERM, and the daemon drains.
    port = free_port()
    env = {
        "TRANSCRIPTD_STORAGE_URL": url,
        "TRANSCRIPTD_SERVER_PORT": str(port),
        "TRANSCRIPTD_INGEST_ACK": "durable",
        "TRANSCRIPTD_STORAGE_SYNCHRONOUS": "full",
    }
    argv = ["-m", "cProfile", "-o", str(Path(directory) / f"{port}.prof"), "-m", "daemon", "serve"]
    return start_server([*argv, "--config", os.devnull], port, env, subprocess.DEVNULL), port


def scrape(port: int) -> dict[str, float]:
    """The commit counters of one replica's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {"transcriptd_commit_duration_seconds_count": "commits", "transcriptd_commit_rows_sum": "rows"}
    found = {"commits": 0.0, "rows": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] = sample.value
    return found


# --- the load -------------------------------------------------------------------------------------------


async def drive(ports: Sequence[int], bodies: Sequence[bytes], senders: int) -> dict[str, Any]:
    """A closed loop of ``senders``, each sending its next body once its last is answered, to the replicas in
    turn (each sender starts at another one, so one request per sender is spread too): status per body
    (0: no answer) and latencies."""
    waiting = deque(range(len(bodies)))
    statuses = [0] * len(bodies)
    latencies: list[float] = []

    async def sender(first: int) -> None:
        connections = [HttpConnection(HOST, port) for port in ports]
        turn = first
        try:
            while waiting:
                index = waiting.popleft()
                connection = connections[turn % len(connections)]
                turn += 1
                try:
                    answer = await connection.post(WEBHOOK, bodies[index])
                except (OSError, asyncio.IncompleteReadError):
                    await connection.close()  # a fresh connection for the next request
                    continue
                statuses[index] = answer.status
                latencies.append(answer.latency_s)
        finally:
            for connection in connections:
                await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender(k) for k in range(min(senders, len(bodies)))))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"seconds": seconds, "statuses": statuses, "latency_ms": percentiles(latencies) if latencies else None}


def stored(conn: Connection, ids: Sequence[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT conversation_id, count(*) FROM messages WHERE conversation_id = ANY(%s) GROUP BY conversation_id",
        (list(ids),),
    ).fetchall()
    return {str(cid): int(count) for cid, count in rows}


def copy_round(conn: Connection, templates: tuple[bytes, ...], prefix: str, transcripts: int) -> dict[str, float]:
    """COPY ``transcripts`` fresh conversations' rows into the replicas' own table (parsed before the clock)."""
    workload = Workload.prepare(conversation_ids(prefix, transcripts), templates)
    deliveries = [tavus.parse(workload.body(i), {}, received_at=time.time())[0] for i in range(transcripts)]
    return copy_messages(conn, deliveries, PER_COMMIT)


def one_run(
    conn: Connection,
    ports: Sequence[int],
    templates: tuple[bytes, ...],
    senders: int,
    requests: int,
    copy_transcripts: int,
) -> dict[str, Any]:
    label = f"r{len(ports)}-s{senders}"
    messages = messages_in(templates[0])
    warm = Workload.prepare(conversation_ids(label, senders * len(ports), warmup=True), templates)
    measured = Workload.prepare(conversation_ids(label, requests), templates)
    bodies = [measured.body(i) for i in range(requests)]
    # Warm-up: every sender's connections open, the replicas' first commits done, off the clock.
    asyncio.run(drive(ports, [warm.body(i) for i in range(len(warm.ids))], senders))
    before = copy_round(conn, templates, f"copy-{label}-before", copy_transcripts)
    # The counters move before a commit's deliveries are answered: the warm-up's are all in ``counted``.
    counted = [scrape(port) for port in ports]
    run = asyncio.run(drive(ports, bodies, senders))
    counters = [scrape(port) for port in ports]
    by_replica = [{k: now[k] - then[k] for k in now} for then, now in zip(counted, counters, strict=True)]
    after = copy_round(conn, templates, f"copy-{label}-after", copy_transcripts)

    ok = [cid for cid, status in zip(measured.ids, run["statuses"], strict=True) if status == 200]
    found = stored(conn, ok)
    lost = sorted(cid for cid in ok if found.get(cid, 0) < messages)
    excess = sorted(cid for cid in ok if found.get(cid, 0) > messages)
    commits = sum(replica["commits"] for replica in by_replica)
    rows = sum(replica["rows"] for replica in by_replica)
    seconds = run["seconds"]
    copy_rate = statistics.fmean([before["rows_per_s"], after["rows_per_s"]])
    statuses: dict[str, int] = {}
    for status in run["statuses"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "replicas": len(ports),
        "senders": senders,
        "requests": requests,
        "ok": len(ok),
        "statuses": dict(sorted(statuses.items())),
        "seconds": seconds,
        "messages_per_s": len(ok) * messages / seconds,
        "latency_ms": run["latency_ms"],
        "commits": commits,
        "commits_per_s": commits / seconds,
        "rows_per_commit": rows / commits if commits else 0.0,
        "rows_committed": rows,
        "commits_by_replica": [replica["commits"] for replica in by_replica],
        "lost": len(lost),
        "lost_sample": lost[:10],
        "excess": len(excess),
        "copy": {"before": before, "after": after, "rows_per_s": copy_rate},
        "of_copy": len(ok) * messages / seconds / copy_rate,
    }


def requests_for(senders: int, requests: int, single: int, per_sender: int) -> int:
    """One sender waits for a commit per request: fewer of them take as long as the others' runs."""
    return single if senders == 1 else max(requests, per_sender * senders)


def run(
    url: str,
    replica_counts: Sequence[int],
    senders: Sequence[int],
    requests: int,
    single: int,
    per_sender: int,
    copy_transcripts: int,
) -> dict[str, Any]:
    templates = body_templates(100, 200, 0)
    runs: list[dict[str, Any]] = []
    with scratch_database(url, "bench_daemon") as database, connect(database, synchronous="full") as conn:
        version = server_version(conn)
        for count in replica_counts:
            with replicas(database, count) as ports:
                for n in senders:
                    count = requests_for(n, requests, single, per_sender)
                    result = one_run(conn, ports, templates, n, count, copy_transcripts)
                    runs.append(result)
                    print(line(result), file=sys.stderr, flush=True)
    copy_rates = sorted(r["copy"]["rows_per_s"] for r in runs)
    return {
        "settings": {
            "replicas": list(replica_counts),
            "senders": list(senders),
            "requests": requests,
            "single_sender_requests": single,
            "requests_per_sender": per_sender,
            "turns": 100,
            "messages_per_request": messages_in(templates[0]),
            "ack": "durable",
            "synchronous": "full",
            "copy_transcripts": copy_transcripts,
            "copy_per_commit": PER_COMMIT,
        },
        "server_version": version,
        "machine": describe(),
        "copy_rows_per_s_median": copy_rates[len(copy_rates) // 2],
        "claim": {**CLAIM, "of_copy": claim_ratio(runs)},
        "runs": runs,
    }


def claim_ratio(runs: Sequence[dict[str, Any]]) -> float | None:
    for r in runs:
        if r["replicas"] == CLAIM["replicas"] and r["senders"] == CLAIM["senders"]:
            return float(r["of_copy"])
    return None


def line(r: dict[str, Any]) -> str:
    latency = r["latency_ms"] or {"p50": 0, "p95": 0, "p99": 0}
    return (
        f"{r['replicas']} replica(s), {r['senders']:>2} senders: {r['messages_per_s']:>7,.0f} messages/s"
        f" = {r['of_copy']:.2f} of COPY ({r['copy']['rows_per_s']:,.0f} rows/s) | ack p50 {latency['p50']:,.0f}"
        f" p95 {latency['p95']:,.0f} p99 {latency['p99']:,.0f} ms | {r['commits_per_s']:.1f} commits/s,"
        f" {r['rows_per_commit']:,.0f} rows per commit | statuses {r['statuses']} | lost {r['lost']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="the server (a database is created on it and dropped)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts (default 1 2)")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 16, 64], help="senders (default 1 16 64)")
    parser.add_argument("--requests", type=int, default=400, help="transcripts per run, at least (default 400)")
    parser.add_argument("--per-sender", type=int, default=8, help="transcripts per sender, at least (default 8)")
    parser.add_argument("--single-requests", type=int, default=80, help="transcripts of a 1-sender run (80)")
    parser.add_argument("--copy-transcripts", type=int, default=COPY_TRANSCRIPTS, help="per COPY round (96)")
    parser.add_argument("--output", type=Path, default=RESULTS / "pg_daemon.json")
    args = parser.parse_args(argv)
    result = run(
        args.url,
        args.replicas,
        args.senders,
        args.requests,
        args.single_requests,
        args.per_sender,
        args.copy_transcripts,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    claim = result["claim"]
    if claim["of_copy"] is not None:
        print(
            f"{claim['replicas']} replicas at {claim['senders']} senders: {claim['of_copy']:.2f} of COPY"
            f" (at least {claim['at_least']}, goal {claim['goal']}); written to {args.output}",
            file=sys.stderr,
        )
    lost = sum(r["lost"] + r["excess"] for r in result["runs"])
    if lost:
        print(f"{lost} acknowledged conversations were not stored exactly once", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
