"""HTTP load against any server taking Tavus webhooks, with a check that what it acknowledged was stored.

    python -m bench.load URL [--mode closed|open] [--concurrency 16] [--requests 1000]
                             [--rate R --duration S] [--turns 100] [--content-chars 200]
                             [--verify-db PATH] [--verify-timeout 60] [--id-prefix load] [--seed 0]
                             [--json OUT] [--no-progress] [--warmup N]

URL is the server's base (``http://127.0.0.1:8000``); every request is a ``application.transcription_ready``
body for a conversation of its own (``{prefix}-{i:06d}``), POSTed to ``/webhooks/tavus``.

Closed loop (the default): ``concurrency`` senders, each sending its next body as soon as its last one is
answered: the server sets the pace, and the figure is its capacity. Open loop: one request every
``1/rate`` s for ``duration`` s whatever the answers; a request's latency runs from when it was *due*, so a
server that falls behind shows it in the percentiles instead of silently slowing the senders down
(coordinated omission).

A 200 says "stored"; a 202 only says "taken". So there are two throughputs: *ack* (2xx answers over the
time until the last answer) and *stored* (their messages over the time until they were all in the
database). With ``--verify-db`` the database file is read after the run (read-only, while the server may
still be writing) until every 2xx conversation has all its messages, or ``--verify-timeout`` runs out:
``lost`` counts the acknowledged conversations that are not fully there. Exit status 1 when it is not 0.

The client shares the machine with the server it measures, so it spends as little CPU per request as it
can: every body is encoded before the clock starts, and one aiohttp session keeps ``concurrency``
connections alive. Use a distinct ``--id-prefix`` for each run against the same database: a conversation
already stored is a duplicate to the server, and verifies trivially.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiohttp
from yarl import URL

from bench.payloads import encode, transcription_ready
from bench.rawhttp import percentiles

T = TypeVar("T")

WEBHOOK = "/webhooks/tavus"
HEADERS = {"Content-Type": "application/json"}
# Long enough that a server deep in overload still answers and shows it in the percentiles; a request
# that takes longer is counted as an error.
REQUEST_TIMEOUT_S = 120.0
# Open loop: requests due while this many are unanswered are not sent, and count as errors. Large, so only
# a server that has stopped answering reaches it, and the client cannot exhaust its own memory.
DEFAULT_MAX_INFLIGHT = 10_000
# Bodies are spliced from a few distinct transcripts: 16 of them cost ~50 ms to generate at 100 turns,
# where one per request would cost ~3 ms each before every run.
TEMPLATE_VARIANTS = 16
# Beyond this much memory the bodies are spliced as they are sent (~10 us each) instead of all up front:
# a long open-loop run would otherwise hold gigabytes.
PREENCODED_BUDGET_BYTES = 1 << 30
PROGRESS_INTERVAL_S = 0.25
VERIFY_POLL_S = 0.005  # a coarser poll would pad the stored throughput of short runs
OVERFLOW = "overflow"
MODES = ("closed", "open")

_PLACEHOLDER = b"@@conversation-id@@"


# --- bodies ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4 * TEMPLATE_VARIANTS)
def _template(turns: int, content_chars: int, seed: int) -> bytes:
    return encode(transcription_ready(_PLACEHOLDER.decode(), turns=turns, seed=seed, content_chars=content_chars))


def body_templates(turns: int, content_chars: int, seed: int) -> tuple[bytes, ...]:
    """Encoded transcripts with a placeholder for the conversation id; cached, so repeated runs skip them."""
    return tuple(_template(turns, content_chars, seed + k) for k in range(TEMPLATE_VARIANTS))


def messages_in(template: bytes) -> int:
    """The transcript entries of a body, system entry included: both the daemon and the naive port store
    every entry as a ``messages`` row (seq = its index), so this is the row count to expect."""
    return len(json.loads(template)["properties"]["transcript"])


@dataclass(frozen=True, slots=True)
class Workload:
    """The conversation ids of a run and their bodies, encoded before the clock starts when they fit."""

    ids: list[str]
    templates: tuple[bytes, ...]
    encoded: list[bytes] | None

    @classmethod
    def prepare(cls, ids: list[str], templates: tuple[bytes, ...]) -> Workload:
        fits = len(ids) * len(templates[0]) <= PREENCODED_BUDGET_BYTES
        workload = cls(ids, templates, None)
        return cls(ids, templates, [workload.splice(i) for i in range(len(ids))]) if fits else workload

    def splice(self, index: int) -> bytes:
        return self.templates[index % len(self.templates)].replace(_PLACEHOLDER, self.ids[index].encode(), 1)

    def body(self, index: int) -> bytes:
        return self.encoded[index] if self.encoded is not None else self.splice(index)


def conversation_ids(prefix: str, count: int, *, warmup: bool = False) -> list[str]:
    infix = "warmup-" if warmup else ""
    return [f"{prefix}-{infix}{i:06d}" for i in range(count)]


# --- sending --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Recorder:
    """Per request: its status (0 when it got no answer) and latency; counters for the progress line."""

    statuses: list[int]
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    done: int = 0
    failed: int = 0

    @classmethod
    def sized(cls, count: int) -> Recorder:
        return cls([0] * count, [0.0] * count)

    def answer(self, index: int, status: int, latency_s: float) -> None:
        self.statuses[index] = status
        self.latencies[index] = latency_s
        self.done += 1

    def fail(self, index: int, kind: str) -> None:
        self.statuses[index] = 0
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.done += 1
        self.failed += 1


async def _send(session: aiohttp.ClientSession, url: URL, body: bytes, index: int, due: float, rec: Recorder) -> None:
    try:
        async with session.post(url, data=body, headers=HEADERS) as response:
            await response.read()  # the whole answer, so the connection goes back to the pool
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        rec.fail(index, exc.__class__.__name__)
        return
    rec.answer(index, status, time.perf_counter() - due)


async def _closed_loop(
    session: aiohttp.ClientSession, url: URL, workload: Workload, concurrency: int, rec: Recorder
) -> None:
    indices = iter(range(len(workload.ids)))  # shared: each sender takes the next one not yet sent

    async def sender() -> None:
        for index in indices:
            await _send(session, url, workload.body(index), index, time.perf_counter(), rec)

    await asyncio.gather(*(sender() for _ in range(min(concurrency, len(workload.ids)))))


async def _open_loop(
    session: aiohttp.ClientSession, url: URL, workload: Workload, rate: float, max_inflight: int, rec: Recorder
) -> None:
    inflight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for index in range(len(workload.ids)):
        due = start + index / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        # Behind schedule, the overdue requests go out at once; their latency still counts from when they were due.
        if len(inflight) >= max_inflight:
            rec.fail(index, OVERFLOW)
            continue
        task = asyncio.create_task(_send(session, url, workload.body(index), index, due, rec))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)


async def _show_progress(rec: Recorder, total: int, started: float, stream: TextIO) -> None:
    try:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            _progress_line(rec, total, started, stream)
    finally:
        _progress_line(rec, total, started, stream)
        stream.write("\n")
        stream.flush()


def _progress_line(rec: Recorder, total: int, started: float, stream: TextIO) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    line = f"{rec.done}/{total} requests  {rec.done / elapsed:,.0f} req/s  {rec.failed} errors  {elapsed:.1f} s"
    stream.write(f"\r{line:<72}")
    stream.flush()


# --- verification ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Verification:
    """What the database file holds of the acknowledged conversations."""

    checked: int
    lost: list[str]  # fewer rows than the transcript had entries (or none)
    excess: list[str]  # more rows than entries: a re-delivery stored twice, or ids reused from another run
    seconds: float
    complete_after_s: float | None  # when every conversation was found complete, from the start of verification
    error: str | None = None

    @property
    def verified(self) -> bool:
        return not self.lost and not self.excess and self.error is None

    def report(self, sample: int = 10) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "checked": self.checked,
            "lost": len(self.lost),
            "lost_sample": self.lost[:sample],
            "excess": len(self.excess),
            "excess_sample": self.excess[:sample],
            "seconds": round(self.seconds, 3),
            "complete_after_s": None if self.complete_after_s is None else round(self.complete_after_s, 3),
            "error": self.error,
        }


def open_read_only(db_path: Path) -> sqlite3.Connection:
    """Read-only, so a verification can never change what it checks, nor take the server's write lock."""
    return sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)


def stored_counts(conn: sqlite3.Connection, lowest: str, highest: str) -> dict[str, int]:
    """Message rows per conversation id in [lowest, highest]: one range of the (conversation_id, ...) key."""
    rows = conn.execute(
        "SELECT conversation_id, count(*) FROM messages WHERE conversation_id BETWEEN ? AND ? GROUP BY conversation_id",
        (lowest, highest),
    ).fetchall()
    return dict(rows)


def verify_stored(
    db_path: Path,
    expected: Mapping[str, int],
    *,
    pending: Collection[str] = (),
    timeout_s: float = 60.0,
    poll_s: float = VERIFY_POLL_S,
) -> Verification:
    """Check that each conversation of ``expected`` has exactly its number of ``messages`` rows.

    ``pending`` are the ones answered 202: stored after their answer, so they are polled for until
    ``timeout_s``. A conversation answered 200 was stored before its answer; if it is incomplete, it is
    lost at once, and no waiting changes that.
    """
    started = time.perf_counter()
    deadline = started + timeout_s
    waiting = set(pending)
    remaining = set(expected)
    excess: set[str] = set()
    complete_after: float | None = 0.0 if not expected else None
    error: str | None = None
    conn: sqlite3.Connection | None = None
    try:
        while remaining:
            query_started = time.perf_counter()
            try:
                if conn is None:
                    conn = open_read_only(db_path)
                # Only the range still incomplete: as conversations complete, each poll reads less.
                counts = stored_counts(conn, min(remaining), max(remaining))
                error = None
            except sqlite3.Error as exc:  # no file or no schema yet, while the server starts or migrates
                error = f"{exc.__class__.__name__}: {exc}"
                counts = {}
            for cid in list(remaining):
                stored, wanted = counts.get(cid, 0), expected[cid]
                if stored >= wanted:
                    remaining.discard(cid)
                    if stored > wanted:
                        excess.add(cid)
            now = time.perf_counter()
            if not remaining:
                complete_after = now - started
                break
            if waiting.isdisjoint(remaining) or now >= deadline:
                break
            # Polling competes for the CPU with the server still storing: at most about a third of a core.
            time.sleep(min(max(poll_s, 2 * (now - query_started)), max(0.0, deadline - now)))
    finally:
        if conn is not None:
            conn.close()
    return Verification(
        checked=len(expected),
        lost=sorted(remaining),
        excess=sorted(excess),
        seconds=time.perf_counter() - started,
        complete_after_s=complete_after,
        error=error,
    )


def count_existing(db_path: Path, ids: Sequence[str]) -> int:
    """Conversations of this run the database already holds: a reused id prefix, which would verify trivially."""
    if not ids or not db_path.exists():
        return 0
    try:
        with contextlib.closing(open_read_only(db_path)) as conn:
            wanted = set(ids)
            return sum(1 for cid in stored_counts(conn, min(ids), max(ids)) if cid in wanted)
    except sqlite3.Error:
        return 0  # no schema yet: nothing stored


# --- the run --------------------------------------------------------------------------------------------


def _throughput(ok: int, messages: int, seconds: float | None) -> dict[str, Any] | None:
    if seconds is None:
        return None
    per_s = 1 / seconds if seconds > 0 else 0.0
    return {
        "seconds": round(seconds, 3),
        "requests": ok,
        "requests_per_s": round(ok * per_s, 1),
        "messages": ok * messages,
        "messages_per_s": round(ok * messages * per_s, 1),
    }


def _statuses(statuses: Iterable[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        if status:
            counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items()))


async def run_load(
    url: str,
    *,
    mode: str = "closed",
    concurrency: int = 16,
    requests: int = 1000,
    rate: float | None = None,
    duration_s: float | None = None,
    turns: int = 100,
    content_chars: int = 200,
    verify_db: Path | None = None,
    verify_timeout_s: float = 60.0,
    id_prefix: str = "load",
    seed: int = 0,
    warmup: int = 0,
    progress: bool = False,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> dict[str, Any]:
    """One load run against ``url``; the report (settings, machine, results) as JSON-ready data.

    Closed mode sends ``requests``; open mode sends ``rate`` per second for ``duration_s``. ``warmup``
    requests (ids of their own) go first, before the clock: they open the connections and warm the server,
    and are verified with the rest but left out of every figure.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if concurrency < 1 or warmup < 0 or max_inflight < 1:
        raise ValueError("concurrency and max_inflight must be at least 1, warmup at least 0")
    if mode == "open":
        if rate is None or duration_s is None or rate <= 0 or duration_s <= 0:
            raise ValueError("open mode needs a positive rate and duration")
        count = round(rate * duration_s)
    else:
        count = requests
    if count < 1:
        raise ValueError("nothing to send: at least one request is needed")

    templates = await asyncio.to_thread(body_templates, turns, content_chars, seed)
    messages = messages_in(templates[0])
    measured = await asyncio.to_thread(Workload.prepare, conversation_ids(id_prefix, count), templates)
    warm = await asyncio.to_thread(Workload.prepare, conversation_ids(id_prefix, warmup, warmup=True), templates)
    preexisting = None
    if verify_db is not None:
        preexisting = await asyncio.to_thread(count_existing, verify_db, warm.ids + measured.ids)

    target = URL(url.rstrip("/") + WEBHOOK)
    rec, warm_rec = Recorder.sized(count), Recorder.sized(warmup)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as s:
        if warmup:
            await _closed_loop(s, target, warm, concurrency, warm_rec)
        started = time.perf_counter()
        reporter = asyncio.create_task(_show_progress(rec, count, started, sys.stderr)) if progress else None
        try:
            if mode == "closed":
                await _closed_loop(s, target, measured, concurrency, rec)
            else:
                assert rate is not None
                await _open_loop(s, target, measured, rate, max_inflight, rec)
        finally:
            ack_seconds = time.perf_counter() - started
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]

    ok_ids = [cid for cid, status in zip(measured.ids, rec.statuses, strict=True) if 200 <= status < 300]
    enqueued = {cid for cid, status in zip(measured.ids, rec.statuses, strict=True) if status == 202}
    acked = ok_ids + [cid for cid, status in zip(warm.ids, warm_rec.statuses, strict=True) if 200 <= status < 300]
    acked_enqueued = enqueued | {cid for cid, status in zip(warm.ids, warm_rec.statuses, strict=True) if status == 202}

    verification: Verification | None = None
    stored_seconds: float | None = None if enqueued else ack_seconds  # a 200 was stored before its answer
    stored_ok = len(ok_ids)
    if verify_db is not None:
        verify_started = time.perf_counter()
        verification = await asyncio.to_thread(
            verify_stored,
            verify_db,
            dict.fromkeys(acked, messages),
            pending=acked_enqueued,
            timeout_s=verify_timeout_s,
        )
        stored_ok -= len(set(verification.lost).intersection(ok_ids))
        if enqueued:
            # The clock stops when the last 202 was found stored (or when verification gave up).
            until = verification.complete_after_s if verification.complete_after_s is not None else verification.seconds
            stored_seconds = max(ack_seconds, verify_started - started + until)

    answered = [latency for latency, status in zip(rec.latencies, rec.statuses, strict=True) if status]
    answered.sort()
    overflow = rec.errors.get(OVERFLOW, 0)
    results: dict[str, Any] = {
        "sent": count - overflow,
        "answered": len(answered),
        "ok": len(ok_ids),
        "statuses": _statuses(rec.statuses),
        "errors": {
            "total": rec.failed,
            "transport": rec.failed - overflow,
            "overflow": overflow,
            "by_type": rec.errors,
        },
        "seconds": round(ack_seconds, 3),
        "throughput": {
            "ack": _throughput(len(ok_ids), messages, ack_seconds),
            "stored": _throughput(stored_ok, messages, stored_seconds),
        },
        "latency_ms": percentiles(answered) if answered else None,
        "warmup": {"sent": warmup, "statuses": _statuses(warm_rec.statuses), "errors": warm_rec.failed},
        "verification": verification.report() if verification is not None else None,
        "lost": len(verification.lost) if verification is not None else None,
        "verified": verification.verified if verification is not None else None,
        "preexisting_conversations": preexisting,
    }
    settings: dict[str, Any] = {
        "url": url,
        "mode": mode,
        "concurrency": concurrency,
        "requests": count,
        "rate": rate,
        "duration_s": duration_s,
        "turns": turns,
        "content_chars": content_chars,
        "messages_per_request": messages,
        "body_bytes_mean": round(len(measured.body(0)) + sum(map(len, templates)) / len(templates) - len(templates[0])),
        "verify_db": str(verify_db) if verify_db is not None else None,
        "verify_timeout_s": verify_timeout_s,
        "id_prefix": id_prefix,
        "seed": seed,
        "warmup": warmup,
        "max_inflight": max_inflight,
    }
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "event_loop": loop_name,
    }
    return {"settings": settings, "machine": machine, "results": results}


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """On uvloop when it is installed, as the servers measured run: the client's own overhead is smaller."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def load(url: str, **options: Any) -> dict[str, Any]:
    """:func:`run_load` for callers without an event loop; the same keyword arguments."""
    return _run(run_load(url, **options))


# --- command line ---------------------------------------------------------------------------------------


def summary(report: Mapping[str, Any]) -> Iterator[str]:
    """The report as a few lines for a person."""
    settings, results = report["settings"], report["results"]
    how = (
        f"open loop, {settings['rate']:g}/s for {settings['duration_s']:g} s"
        if settings["mode"] == "open"
        else "closed loop"
    )
    yield (
        f"{how}, {settings['concurrency']} connections: {settings['requests']} requests of "
        f"{settings['messages_per_request']} messages ({settings['body_bytes_mean'] / 1024:.1f} KiB) "
        f"in {results['seconds']:.2f} s; statuses {results['statuses'] or '{}'}, errors {results['errors']['total']}"
        + (f" {results['errors']['by_type']}" if results["errors"]["total"] else "")
    )
    for kind in ("ack", "stored"):
        figures = results["throughput"][kind]
        if figures is None:
            yield f"{kind + ':':<8}unknown (202 answers, no --verify-db)"
        else:
            yield (
                f"{kind + ':':<8}{figures['requests_per_s']:,.1f} req/s  {figures['messages_per_s']:,.0f} messages/s"
                f"  over {figures['seconds']:.2f} s"
            )
    if (latency := results["latency_ms"]) is not None:
        yield "latency: " + "  ".join(f"{q} {latency[q]:,.1f}" for q in ("p50", "p95", "p99", "max", "mean")) + " ms"
    if (verification := results["verification"]) is not None:
        verdict = "verified" if verification["verified"] else "NOT verified"
        yield (
            f"{verdict}: {verification['checked']} acknowledged conversations checked, {verification['lost']} lost, "
            f"{verification['excess']} with extra rows"
            + (f"; {verification['error']}" if verification["error"] else "")
            + (f"; lost e.g. {verification['lost_sample']}" if verification["lost"] else "")
        )
    if results["preexisting_conversations"]:
        yield (
            f"warning: {results['preexisting_conversations']} of these conversation ids were already stored "
            "before the run: use another --id-prefix"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--mode", choices=MODES, default="closed", help="closed (default) or open loop")
    parser.add_argument("--concurrency", type=int, default=16, help="connections, and senders in closed loop (16)")
    parser.add_argument("--requests", type=int, default=1000, help="closed loop: requests to send (1000)")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, help="open loop: seconds")
    parser.add_argument("--turns", type=int, default=100, help="transcript entries besides the system one (100)")
    parser.add_argument("--content-chars", type=int, default=200, help="characters per entry (200)")
    parser.add_argument("--verify-db", type=Path, metavar="PATH", help="the server's SQLite file: check every 2xx")
    parser.add_argument("--verify-timeout", type=float, default=60.0, metavar="S", help="wait for 202s (60)")
    parser.add_argument("--id-prefix", default="load", help="conversation ids are PREFIX-000000... (load)")
    parser.add_argument("--seed", type=int, default=0, help="transcript generator seed (0)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N", help="requests sent before the clock (0)")
    parser.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the full report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress line (shown only on a terminal)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "open" and (args.rate is None or args.duration is None):
        parser.error("--mode open needs --rate and --duration")
    try:
        report = load(
            args.url,
            mode=args.mode,
            concurrency=args.concurrency,
            requests=args.requests,
            rate=args.rate,
            duration_s=args.duration,
            turns=args.turns,
            content_chars=args.content_chars,
            verify_db=args.verify_db,
            verify_timeout_s=args.verify_timeout,
            id_prefix=args.id_prefix,
            seed=args.seed,
            warmup=args.warmup,
            progress=not args.no_progress and sys.stderr.isatty(),
            max_inflight=args.max_inflight,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print("bench.load: interrupted", file=sys.stderr)
        return 130
    for line in summary(report):
        print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 1 if report["results"]["verified"] is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
