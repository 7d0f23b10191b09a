"""Invalidating one conversation's cached pages, as the cache grows: the write-up's claim, measured.

The write-up claimed "cache invalidation by pattern is 10x faster than 10 sequential DELs (500 ms -> 50 ms)".
For each cache size N this times the invalidation of one conversation's 10 page keys four ways:

(a) ``redis_sequential_del``: the "before" path, 10 awaited ``DEL``s on a real Redis (10 round trips);
(b) ``redis_keys_del``: the "after" path, ``KEYS messages:{id}:*`` then one ``DEL`` (2 round trips, but
    ``KEYS`` walks the whole keyspace, so it grows with N);
(c) ``evict_prefix``: transcriptd's :class:`daemon.cache.PrefixTTLCache` holding the same N entries,
    which finds the conversation's keys in its prefix index, so it costs O(10) whatever N is;
(d) ``dict_scan``: :class:`bench.naive.InProcessDictCache`, a dict scanned with the same glob, i.e. ``KEYS``
    without the network, for reference.

Key layout, the write-up's: every cached conversation has its first 10 pages cached, so N keys are N/10
conversations of 10 page keys ``messages:{conversationId}:{page}:50`` (pages 1..10), and the target is one
of them (N must be a multiple of 10). transcriptd's cache holds the same pages under its own key shape,
``("conv", id, "messages", source, page, after, limit, role, include_system)``. Values are a few bytes:
neither ``KEYS`` nor a ``DEL`` of a string reads the value, and a realistic page (tens of KB) times a
million would not fit in memory.

Every repetition invalidates 10 keys that are really there: the evicted keys are re-filled between
repetitions, outside the timed part, and each run is checked to have deleted exactly those 10 keys (and
nothing else), since a bench that times a no-op reports nonsense. Redis runs over loopback with no added
delay, so (a)/(b) shows what the round trips cost here; the write-up's 50 ms per ``DEL`` would be a
remote Redis under load.

The Redis part uses a logical database of its own and empties it (FLUSHDB) before and after; database 0
is refused. With no Redis answering, it is skipped (and reported as such) and (c) and (d) still run.

    python -m bench.invalidation [--sizes 1000,10000,100000,1000000] [--repeats N] [--redis-url URL]
                                 [--output bench/results/invalidation.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from bench.naive import CACHED_PAGES, PAGE_SIZE, SOURCE, InProcessDictCache, conversation_pattern, page_key
from bench.redis_cache import DEFAULT_URL, RedisCache, check_redis_url, redacted, redis_available
from daemon.cache import Key, PrefixTTLCache

RESULTS: Final = Path(__file__).parent / "results"
DEFAULT_SIZES: Final = (1_000, 10_000, 100_000, 1_000_000)
CLAIM: Final = "cache invalidation by pattern is 10x faster than 10 sequential DELs (500 ms -> 50 ms)"
METHODS: Final = ("redis_sequential_del", "redis_keys_del", "evict_prefix", "dict_scan")
PAGES: Final = len(CACHED_PAGES)
VALUE: Final = "p"
# Keys per MSET: big enough that a million keys take 100 commands, small enough to keep each reply quick.
MSET_CHUNK: Final = 10_000
# MSETs sent per pipeline round trip: bounds what the client buffers (a million keys would be ~40 MB of commands).
MSETS_PER_FLUSH: Final = 10
TTL_S: Final = 10.0**9  # nothing may expire during a run: every eviction must find its 10 live keys


class NoOpMeasured(AssertionError):
    """A timed invalidation did not delete exactly the target's 10 keys: its time would mean nothing."""


def default_repeats(size: int) -> int:
    """Many samples where one is cheap, few where a scan of a million keys is (keeps the run well under 90 s)."""
    return max(20, min(200, 2_000_000 // size))


def conversation_id(index: int) -> str:
    # Fixed width, so no id is a prefix of another; the colon after the id makes the glob exact anyway.
    return f"c{index:08d}"


def redis_keys(size: int) -> Iterator[str]:
    for index in range(size // PAGES):
        cid = conversation_id(index)
        for page in CACHED_PAGES:
            yield page_key(cid, page)


def cache_key(cid: str, page: int) -> Key:
    """The key transcriptd's API caches a page under (daemon/api.py), for the write-up's page ``page``."""
    return ("conv", cid, "messages", SOURCE, page, None, PAGE_SIZE, None, False)


def check_sizes(sizes: Sequence[int]) -> None:
    for size in sizes:
        if size < PAGES or size % PAGES:
            raise ValueError(f"cache size {size} is not a positive multiple of {PAGES}: conversations of {PAGES} pages")


def summary(samples_ns: Sequence[int], round_trips: int) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    # Nearest rank: a p95 that is one of the samples, never an interpolation between two.
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return {
        "median_us": round(statistics.median(ordered) / 1e3, 2),
        "p95_us": round(p95 / 1e3, 2),
        "min_us": round(ordered[0] / 1e3, 2),
        "max_us": round(ordered[-1] / 1e3, 2),
        "samples": len(ordered),
        "deleted_per_run": PAGES,
        "round_trips": round_trips,
    }


def ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    # Significant digits, not decimals: at a million keys (a)/(b) is a few thousandths.
    return float(f"{numerator['median_us'] / denominator['median_us']:.4g}")


def expect(method: str, what: str, got: object, wanted: object) -> None:
    if got != wanted:
        raise NoOpMeasured(f"{method}: {what} is {got!r}, not {wanted!r}")


# --- Redis: (a) and (b) ---------------------------------------------------------------------------------


async def fill_redis(admin: aioredis.Redis, size: int) -> float:
    started = time.perf_counter()
    async with admin.pipeline(transaction=False) as pipe:
        chunk: dict[str, str] = {}
        queued = 0
        for key in redis_keys(size):
            chunk[key] = VALUE
            if len(chunk) == MSET_CHUNK:
                pipe.mset(chunk)
                chunk, queued = {}, queued + 1
                if queued == MSETS_PER_FLUSH:
                    await pipe.execute()
                    queued = 0
        if chunk:
            pipe.mset(chunk)
        await pipe.execute()
    stored = await admin.dbsize()
    expect("fill", "the number of Redis keys", stored, size)
    return time.perf_counter() - started


async def measure_redis(url: str, size: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(a) and (b) at ``size`` keys; also how long the fill took."""
    target = conversation_id(size // PAGES // 2)
    targets = {page_key(target, page): VALUE for page in CACHED_PAGES}
    pattern = conversation_pattern(target)

    async def sequential(cache: RedisCache) -> int:  # process_before's loop
        deleted = 0
        for page in CACHED_PAGES:
            deleted += await cache.delete(page_key(target, page))
        return deleted

    async def by_pattern(cache: RedisCache) -> int:  # process_after's call
        return await cache.delete_pattern(pattern)

    runs: dict[str, tuple[Callable[[RedisCache], Awaitable[int]], int]] = {
        "redis_sequential_del": (sequential, PAGES),
        "redis_keys_del": (by_pattern, 2),
    }
    samples: dict[str, list[int]] = {name: [] for name in runs}
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await admin.flushdb()
        fill_s = await fill_redis(admin, size)
        async with RedisCache(url) as cache:
            # One untimed round first: the connection is opened by the first command, not worth timing.
            for repetition in range(-1, repeats):
                # Alternate which goes first, so neither always runs just after the other's refill.
                order = list(runs) if repetition % 2 == 0 else list(reversed(runs))
                for name in order:
                    invalidate, round_trips = runs[name]
                    commands = cache.commands
                    started = time.perf_counter_ns()
                    deleted = await invalidate(cache)
                    elapsed = time.perf_counter_ns() - started
                    expect(name, "the number of keys deleted", deleted, PAGES)
                    expect(name, "the number of round trips", cache.commands - commands, round_trips)
                    async with admin.pipeline(transaction=False) as pipe:
                        pipe.exists(*targets)
                        pipe.dbsize()
                        left, stored = await pipe.execute()
                    expect(name, "the number of target keys left", left, 0)
                    expect(name, "the number of keys left", stored, size - PAGES)
                    await admin.mset(targets)  # the refill, untimed
                    if repetition >= 0:
                        samples[name].append(elapsed)
    finally:
        await admin.flushdb()
        await admin.aclose()
    sequential_stats, pattern_stats = (summary(samples[name], runs[name][1]) for name in runs)
    return sequential_stats, pattern_stats, fill_s


async def redis_version(url: str) -> str:
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        info = await admin.info("server")
    finally:
        await admin.aclose()
    return str(info["redis_version"])


# --- in-process: (c) and (d) ----------------------------------------------------------------------------


def filled(fill: Callable[[], None]) -> float:
    # The collector would walk the growing cache again and again while it fills: off during the fill, then
    # one collection so no backlog of it lands inside a timed eviction.
    started = time.perf_counter()
    gc.disable()
    try:
        fill()
    finally:
        gc.enable()
    gc.collect()
    return time.perf_counter() - started


def measure_evict_prefix(size: int, repeats: int) -> dict[str, Any]:
    """(c): transcriptd's cache, sized to hold all ``size`` entries, none expiring."""
    cache = PrefixTTLCache(size, ttl=TTL_S)
    target = conversation_id(size // PAGES // 2)
    targets = [cache_key(target, page) for page in CACHED_PAGES]

    def fill() -> None:
        for index in range(size // PAGES):
            cid = conversation_id(index)
            for page in CACHED_PAGES:
                cache[cache_key(cid, page)] = VALUE

    filled(fill)
    expect("evict_prefix", "the number of cached entries", len(cache), size)
    samples: list[int] = []
    for repetition in range(-1, repeats):
        started = time.perf_counter_ns()
        removed = cache.evict_prefix(("conv", target))
        elapsed = time.perf_counter_ns() - started
        expect("evict_prefix", "the number of keys deleted", removed, PAGES)
        expect("evict_prefix", "the number of keys left", len(cache), size - PAGES)
        expect("evict_prefix", "the number of target keys left", sum(key in cache for key in targets), 0)
        for key in targets:
            cache[key] = VALUE
        if repetition >= 0:
            samples.append(elapsed)
    return summary(samples, 0)


async def measure_dict_scan(size: int, repeats: int) -> dict[str, Any]:
    """(d): the glob matched against every key, as ``KEYS`` does, in this process."""
    cache = InProcessDictCache()
    target = conversation_id(size // PAGES // 2)
    targets = {page_key(target, page): VALUE for page in CACHED_PAGES}
    pattern = conversation_pattern(target)
    filled(lambda: cache.data.update(dict.fromkeys(redis_keys(size), VALUE)))
    expect("dict_scan", "the number of cached entries", len(cache.data), size)
    samples: list[int] = []
    for repetition in range(-1, repeats):
        started = time.perf_counter_ns()
        deleted = await cache.delete_pattern(pattern)
        elapsed = time.perf_counter_ns() - started
        expect("dict_scan", "the number of keys deleted", deleted, PAGES)
        expect("dict_scan", "the number of keys left", len(cache.data), size - PAGES)
        expect("dict_scan", "the number of target keys left", sum(key in cache.data for key in targets), 0)
        cache.data.update(targets)
        if repetition >= 0:
            samples.append(elapsed)
    return summary(samples, 0)


# --- the sweep ------------------------------------------------------------------------------------------


async def sweep(sizes: Sequence[int], repeats: int | None, redis_url: str) -> dict[str, Any]:
    started = time.perf_counter()
    skipped = await redis_available(redis_url)
    version = None if skipped else await redis_version(redis_url)
    results: list[dict[str, Any]] = []
    for size in sizes:
        count = repeats if repeats is not None else default_repeats(size)
        sequential: dict[str, Any] | None = None
        pattern: dict[str, Any] | None = None
        fill_s: float | None = None
        if skipped is None:
            sequential, pattern, fill_s = await measure_redis(redis_url, size, count)
        evict = measure_evict_prefix(size, count)
        scan = await measure_dict_scan(size, count)
        results.append(
            {
                "size": size,
                "conversations": size // PAGES,
                "repeats": count,
                "redis_fill_s": None if fill_s is None else round(fill_s, 3),
                "methods": {
                    "redis_sequential_del": sequential,
                    "redis_keys_del": pattern,
                    "evict_prefix": evict,
                    "dict_scan": scan,
                },
                "ratios": {
                    # The write-up's claim: this was to be 10.
                    "sequential_del_over_keys_del": ratio(sequential, pattern),
                    "keys_del_over_evict_prefix": ratio(pattern, evict),
                    "dict_scan_over_evict_prefix": ratio(scan, evict),
                },
            }
        )
        gc.collect()
    return {
        "claim": CLAIM,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "redis_version": version,
        },
        "settings": {
            "sizes": list(sizes),
            "repeats": repeats if repeats is not None else "auto",
            "redis_url": redacted(redis_url),
            "key_layout": f"N/{PAGES} conversations x {PAGES} page keys messages:{{id}}:{{page}}:{PAGE_SIZE}",
            "percentile": "nearest rank",
        },
        "redis_skipped": skipped,
        "results": results,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def run(
    sizes: Sequence[int] = DEFAULT_SIZES, repeats: int | None = None, redis_url: str = DEFAULT_URL
) -> dict[str, Any]:
    """The sweep's report (what ``main`` writes as JSON). ``repeats=None``: :func:`default_repeats` per size.

    Raises ValueError on a size that is not a multiple of 10 or a Redis URL of database 0, and
    :class:`NoOpMeasured` if an invalidation did not delete its 10 keys.
    """
    check_sizes(sizes)
    check_redis_url(redis_url)
    if repeats is not None and repeats < 1:
        raise ValueError("repeats must be at least 1")
    return anyio.run(sweep, sizes, repeats, redis_url)


def table(report: dict[str, Any]) -> str:
    def cell(stats: dict[str, Any] | None) -> str:
        return "-" if stats is None else f"{stats['median_us']:.1f} / {stats['p95_us']:.1f}"

    def times(value: float | None) -> str:
        if value is None:
            return "-"
        # Whole numbers once large; four decimals where (a)/(b) falls to thousandths.
        return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x" if value >= 0.1 else f"{value:.4f}x"

    lines = [
        f'The write-up: "{CLAIM}"',
        f"Invalidating one conversation's {PAGES} page keys, median / p95 in microseconds "
        f"(Redis {report['machine']['redis_version'] or '-'}, {report['machine']['cpus']} CPUs)",
        f"{'keys':>10} {'runs':>5} {'(a) 10 x DEL':>20} {'(b) KEYS + DEL':>20} {'(c) evict_prefix':>18} "
        f"{'(d) dict scan':>22} {'a/b':>8} {'b/c':>8}",
    ]
    for row in report["results"]:
        methods, ratios = row["methods"], row["ratios"]
        lines.append(
            f"{row['size']:>10,} {row['repeats']:>5} {cell(methods['redis_sequential_del']):>20} "
            f"{cell(methods['redis_keys_del']):>20} {cell(methods['evict_prefix']):>18} "
            f"{cell(methods['dict_scan']):>22} {times(ratios['sequential_del_over_keys_del']):>8} "
            f"{times(ratios['keys_del_over_evict_prefix']):>8}"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
        check_sizes(sizes)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.invalidation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES), help="total cached keys, each")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method and size (default: by size)")
    parser.add_argument("--redis-url", default=DEFAULT_URL, help="a database the bench may empty (not 0)")
    parser.add_argument("--output", type=Path, default=RESULTS / "invalidation.json")
    args = parser.parse_args(argv)
    try:
        check_redis_url(args.redis_url)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")

    report = run(args.sizes, args.repeats, args.redis_url)
    if report["redis_skipped"] is not None:
        print(f"Redis part skipped: {report['redis_skipped']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"({report['wall_s']} s; {args.output})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
