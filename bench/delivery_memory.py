"""What a delivery held in memory really costs, for the in-flight budget (``storage.deliveries.weight_of``).

Each kind of body is parsed by intake's own parsers and submitted to a real ``ActorRegistry`` whose writer
never takes anything (a stuck database), each delivery to a conversation of its own (an actor each: the
worst case). Per delivery: the bytes tracemalloc sees still held, and the growth of the process's RSS,
each kind in a fresh process so one kind's freed memory does not serve the next.

    python -m bench.delivery_memory [--count 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import anyio

from bench.payloads import encode, envelope, transcription_ready
from daemon.actors import ActorRegistry
from daemon.inflight import InFlight
from daemon.sources import generic, tavus
from storage.deliveries import Record, weight_of


class _StuckWriter:
    def offer(self, unit: list[InFlight]) -> bool:
        return False


def _bodies(kind: str, n: int) -> tuple[Callable[[bytes, str], Record], bytes]:
    if kind == "generic-1":
        body = encode({"role": "user", "content": "x" * 80, "id": f"m{n}"})
        return (lambda b, cid: generic.parse(b, {}, received_at=time.time(), conversation_id=cid)[0]), body
    if kind == "generic-10":
        body = json.dumps([{"role": "user", "content": "x" * 80, "id": f"m{n}-{i}"} for i in range(10)]).encode()
        return (lambda b, cid: generic.parse(b, {}, received_at=time.time(), conversation_id=cid)[0]), body
    if kind == "tavus-event":
        body = encode(envelope(f"c{n}", "system.replica_joined", {}))
        return (lambda b, cid: tavus.parse(b, {}, received_at=time.time())[0]), body
    turns = {"tavus-transcript-10": 10, "tavus-transcript-100": 100}[kind]
    body = encode(transcription_ready(f"c{n}", turns=turns, seed=n))
    return (lambda b, cid: tavus.parse(b, {}, received_at=time.time())[0]), body


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _measure(kind: str, count: int, traced: bool) -> dict[str, float]:
    registry = ActorRegistry(
        _StuckWriter(), mailbox_size=64, max_rows=20_000, retry_after_s=1, max_inflight_bytes=2**62
    )
    bodies = [_bodies(kind, n) for n in range(count)]  # made first: they stand for the request's bytes
    gc.collect()
    rss0 = _rss()
    if traced:  # its own bookkeeping takes memory per block: RSS is measured in a run without it
        tracemalloc.start()
    held0 = tracemalloc.get_traced_memory()[0]
    rows = body_bytes = 0
    for n, (parse, body) in enumerate(bodies):
        delivery = InFlight(parse(body, f"c{n}"), awaited=False)
        registry.submit(delivery)
        rows += delivery.record.size - 1
        body_bytes += len(body)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - held0
    tracemalloc.stop()
    rss = _rss() - rss0
    return {
        "body_bytes": body_bytes / count,
        "rows": rows / count,
        ("held_bytes" if traced else "rss_bytes"): (held if traced else rss) / count,
        "weight_before_parse": weight_of(int(body_bytes / count)),
        "weight": registry.inflight_bytes / count,
    }


KINDS = ("generic-1", "generic-10", "tavus-event", "tavus-transcript-10", "tavus-transcript-100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # one kind, in this process
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(anyio.run(_measure, args.kind, args.count, args.traced)))
        return
    for kind in KINDS:
        count = args.count if "100" not in kind else max(1, args.count // 20)
        figures: dict[str, float] = {}
        for traced in ([], ["--traced"]):
            argv = [sys.executable, "-m", "bench.delivery_memory", "--kind", kind, "--count", str(count), *traced]
            figures.update(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout))
        print(f"{kind:22} " + "  ".join(f"{k}={v:,.0f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
