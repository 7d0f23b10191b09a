"""Full-text search, measured side by side in one run.

1. What the index costs at ingest: durable ingest at 16 senders into a fresh database, in alternated
   rounds with the index on (the default) and off (``search.enabled = false``: the writes index nothing,
   their only remaining work is one lookup of the one-row ``search_backfill`` table per insert
   statement, and the update and delete triggers skip every row). Each round posts the same Tavus
   transcripts of varied text.
2. Search latency over a large database (1,000,000 messages by default): built with multi-row inserts in
   big transactions through the same schema, each indexed by the function the writes use (so the index
   is built as the writer builds it), then ``GET /search`` one request at a time from a mix of queries:
   a common word, a rare word, a phrase, a prefix, an exclusion, and filters by role and by source.

    python -m bench.search [--messages 1000000] [--rounds 3] [--webhooks 400] [--output X.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench.ingest_limit import RESULTS, WEBHOOK
from bench.machine import describe
from bench.payloads import envelope
from bench.processes import start_transcriptd, stop
from bench.rawhttp import Connection, closed_loop, percentiles
from storage import search_index
from storage.connection import open_writer
from storage.migrations import migrate

SENDERS = 16
TURNS = 60

# A call centre's words, most frequent first: picked with a Zipf-like weight, so a few are in most messages
# and most are rare, as in speech.
VOCABULARY = (
    "the I you to a and it is that of for my on can in we have be this with your do what me no yes so "
    "just like about not it's but at there are was if get know would please okay thank thanks need order "
    "account help call number time today could one want here will check booking reservation refund "
    "payment card email address name phone date tomorrow Monday Tuesday Wednesday Thursday Friday "
    "weekend morning afternoon evening appointment delivery package tracking cancel change update "
    "confirm problem issue again sorry understand moment minute second system price cost charge bill "
    "invoice fee discount plan subscription upgrade downgrade renew expire password login reset code "
    "message text support agent manager supervisor transfer hold wait line voicemail callback later "
    "earlier week month year last next first second third address street city zip postcode country "
    "flight hotel room table seat ticket réservation rendez-vous remboursement facture commande "
    "livraison merci bonjour oui non reembolso cita pedido factura gracias hola sí entrega Zürich Müller "
    "café naïve façade résumé insurance claim policy coverage deductible premium accident damage repair "
    "warranty replacement battery screen charger cable router internet connection outage slow signal "
    "coverage roaming data doctor prescription pharmacy clinic insurance dental vision referral copay "
    "lab results scan "
)
WORDS = VOCABULARY.split()
WEIGHTS = [1 / (rank + 1) ** 0.9 for rank in range(len(WORDS))]


def sentence(rng: random.Random, words: int) -> str:
    picked = rng.choices(WORDS, WEIGHTS, k=words)
    if rng.random() < 0.2:
        picked.append(f"#{rng.randrange(100_000, 999_999)}")  # an order or ticket number: rare tokens
    text = " ".join(picked)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", "."])


def transcript_body(conversation_id: str, seed: int) -> bytes:
    rng = random.Random(seed)
    entries: list[dict[str, Any]] = [{"role": "system", "content": "You are Ana, a patient support agent. " * 40}]
    for i in range(TURNS):
        entries.append(
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": sentence(rng, rng.randint(4, 40)),
                "timestamp": 1740824130.0 + i * 2.5,
            }
        )
    body = envelope(conversation_id, "application.transcription_ready", {"replica_id": "r-1", "transcript": entries})
    return json.dumps(body).encode()


# ---- 1. ingest, with and without the index ----------------------------------------------------------------

VARIANTS = ("index", "search.enabled=false")


async def send_all(port: int, bodies: list[bytes]) -> dict[str, Any]:
    return await closed_loop(port, bodies, SENDERS, lambda connection, body: connection.post(WEBHOOK, body))


def ingest_round(workdir: Path, variant: str, bodies: list[bytes], round_no: int) -> dict[str, Any]:
    db = workdir / f"ingest-{round_no}-{VARIANTS.index(variant)}.db"
    env = {"TRANSCRIPTD_SEARCH_ENABLED": "false"} if variant == "search.enabled=false" else {}
    process, port = start_transcriptd(db, env=env)
    try:
        run = asyncio.run(send_all(port, bodies))
    finally:
        stop(process)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        indexed = conn.execute("SELECT count(*) FROM messages_fts_docsize").fetchone()[0]
    conn.close()
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    run["rows"] = stored
    run["indexed"] = indexed
    run["rows_per_s"] = stored / run["seconds"]
    return run


def ingest(rounds: int, webhooks: int) -> dict[str, Any]:
    bodies = [transcript_body(f"ingest-{i:06d}", seed=i) for i in range(webhooks)]
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="transcriptd-search-") as tmp:
        for round_no in range(rounds):
            # Alternated, and the order turned each round: drift in the machine's load hits every variant alike.
            order = VARIANTS if round_no % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                run = ingest_round(Path(tmp), variant, bodies, round_no)
                runs[variant].append(run)
                print(
                    f"  round {round_no + 1} {variant:22s} {run['rows_per_s']:9,.0f} rows/s  "
                    f"ack p50 {run['latency_ms']['p50']} ms p99 {run['latency_ms']['p99']} ms  "
                    f"(indexed {run['indexed']:,} of {run['rows']:,})",
                    flush=True,
                )
    medians = {variant: statistics.median(r["rows_per_s"] for r in runs[variant]) for variant in VARIANTS}
    return {
        "senders": SENDERS,
        "webhooks": webhooks,
        "messages_per_webhook": TURNS + 1,
        "runs": runs,
        "median_rows_per_s": medians,
        "cost": 1 - medians["index"] / medians["search.enabled=false"],
    }


# ---- 2. search latency over a large database ----------------------------------------------------------------

CHUNK = 50_000
MESSAGES_PER_CONVERSATION = 50


def build(db: Path, messages: int) -> float:
    """``messages`` messages of varied text in ``db``, indexed as the writes index them; the seconds taken."""
    started = time.perf_counter()
    conn = open_writer(db, synchronous="normal")
    rng = random.Random(11)
    try:
        migrate(conn)
        conversations = (messages + MESSAGES_PER_CONVERSATION - 1) // MESSAGES_PER_CONVERSATION
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO conversations (id, source, status, created_at, updated_at) VALUES (?, ?, 'ended', ?, ?)",
            ((f"conv-{c:07d}", "tavus" if c % 3 else "api", 1.7e9 + c, 1.7e9 + c) for c in range(conversations)),
        )
        conn.execute("COMMIT")

        def rows(start: int, stop: int) -> Iterator[tuple[Any, ...]]:
            for n in range(start, stop):
                c, seq = divmod(n, MESSAGES_PER_CONVERSATION)
                role = "system" if seq == 0 else ("user" if seq % 2 else "assistant")
                content = "You are Ana, a patient support agent." if seq == 0 else sentence(rng, rng.randint(4, 40))
                yield (f"conv-{c:07d}", "tavus" if c % 3 else "api", seq, role, content, 1.7e9 + n, 1.7e9 + n)

        for start in range(0, messages, CHUNK):
            conn.execute("BEGIN")
            before = search_index.last_id(conn)
            conn.executemany(
                "INSERT INTO messages (conversation_id, source, seq, role, content, timestamp, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows(start, min(messages, start + CHUNK)),
            )
            search_index.index_after(conn, before)  # as storage.writes does after its inserts
            conn.execute("COMMIT")
            done = min(messages, start + CHUNK)
            print(f"\r  building: {done:,} of {messages:,} messages", end="", flush=True)
        print()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def queries(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(kind, URL) pairs, the kinds in turn."""
    rare = WORDS[-60:]
    kinds: list[tuple[str, Callable[[], dict[str, str]]]] = [
        ("common word", lambda: {"q": rng.choice(WORDS[20:40])}),
        ("rare word", lambda: {"q": rng.choice(rare)}),
        ("two words", lambda: {"q": f"{rng.choice(WORDS[40:120])} {rng.choice(WORDS[40:120])}"}),
        ("phrase", lambda: {"q": f'"{rng.choice(WORDS[30:90])} {rng.choice(WORDS[0:30])}"'}),
        ("prefix", lambda: {"q": rng.choice(["refun*", "reserv*", "appoint*", "deliv*", "canc*", "subscr*"])}),
        ("exclusion", lambda: {"q": f"{rng.choice(WORDS[60:140])} -{rng.choice(WORDS[0:20])}"}),
        ("by role", lambda: {"q": rng.choice(WORDS[40:140]), "role": "assistant"}),
        ("by source", lambda: {"q": rng.choice(WORDS[40:140]), "source": "api"}),
    ]
    planned = []
    for i in range(count):
        kind, make = kinds[i % len(kinds)]
        planned.append((kind, "/search?" + urlencode(make())))
    return planned


async def measure(port: int, planned: list[tuple[str, str]]) -> dict[str, Any]:
    connection = Connection("127.0.0.1", port)
    by_kind: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    hits: dict[str, int] = {}
    try:
        for _, url in planned[: len(planned) // 10]:  # warm the page cache first
            await connection.get(url)
        for kind, url in planned:
            answer = await connection.get(url)
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            by_kind.setdefault(kind, []).append(answer.latency_s)
            hits[kind] = hits.get(kind, 0) + len(json.loads(answer.body).get("hits", []))
    finally:
        await connection.close()
    everything = sorted(latency for latencies in by_kind.values() for latency in latencies)
    return {
        "statuses": statuses,
        "latency_ms": percentiles(everything),
        "by_kind": {
            kind: {"latency_ms": percentiles(sorted(latencies)), "hits_per_page": hits[kind] / len(latencies)}
            for kind, latencies in by_kind.items()
        },
    }


def latency(messages: int, count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="transcriptd-search-") as tmp:
        db = Path(tmp) / "search.db"
        build_s = build(db, messages)
        size = sum(path.stat().st_size for path in db.parent.glob(db.name + "*"))
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            index_pages = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'messages_fts%'").fetchone()[0]
        conn.close()
        process, port = start_transcriptd(db)
        try:
            result = asyncio.run(measure(port, queries(random.Random(5), count)))
        finally:
            stop(process)
    result.update(messages_stored=stored, build_s=build_s, database_bytes=size, index_bytes=index_pages)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the search latency database")
    parser.add_argument("--searches", type=int, default=800, help="searches timed")
    parser.add_argument("--rounds", type=int, default=4, help="alternated ingest rounds of each variant")
    parser.add_argument("--webhooks", type=int, default=1000, help="transcripts posted per ingest round")
    parser.add_argument("--quick", action="store_true", help="a small database and one short round")
    parser.add_argument("--output", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.searches, args.rounds, args.webhooks = 20_000, 80, 1, 32
    print(f"ingest at {SENDERS} durable senders, {args.rounds} alternated rounds of {args.webhooks} transcripts")
    ingested = ingest(args.rounds, args.webhooks)
    print(f"search latency over {args.messages:,} messages")
    searched = latency(args.messages, args.searches)
    report = {
        "machine": describe(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "output"},
        "ingest": ingested,
        "search": searched,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    medians = ingested["median_rows_per_s"]
    print(
        "ingest medians: "
        + ", ".join(f"{variant} {rate:,.0f} rows/s" for variant, rate in medians.items())
        + f"; the index costs {ingested['cost']:.1%} of durable throughput"
    )
    lat = searched["latency_ms"]
    print(
        f"search over {searched['messages_stored']:,} messages: p50 {lat['p50']} ms, p99 {lat['p99']} ms "
        f"(statuses {searched['statuses']}; built in {searched['build_s']:.0f} s)"
    )
    for kind, figures in searched["by_kind"].items():
        print(f"  {kind:12s} p50 {figures['latency_ms']['p50']:8} ms  p99 {figures['latency_ms']['p99']:8} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
