"""The bench's Redis baseline (bench/redis_cache.py) and the invalidation sweep (bench/invalidation.py).

The Redis tests run against the local server, in a database of their own that they empty before and after
(never database 0), and are skipped, with the reason, when none answers. Nothing here asserts a time:
what the delay buys is checked by counting the round trips that pay it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis

import bench.invalidation as invalidation
import bench.roundtrip as roundtrip
from bench.naive import CACHED_PAGES, conversation_pattern, page_key
from bench.redis_cache import DEFAULT_URL, RedisCache, redis_available
from daemon.cache import PrefixTTLCache

URL = DEFAULT_URL
# Nothing listens on port 1: the sweep's no-Redis path, tested whether or not a Redis runs.
NO_REDIS_URL = "redis://127.0.0.1:1/15"


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_up() -> str:
    reason = anyio.run(redis_available, URL)
    if reason is not None:
        pytest.skip(f"Redis part skipped: {reason}")
    return URL


@pytest.fixture
def redis_url(redis_up: str) -> Iterator[str]:
    """The test database, empty, and emptied again afterwards."""
    flush(redis_up)
    yield redis_up
    flush(redis_up)


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of its own to fill and inspect the database, so RedisCache.commands counts only the test's calls."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def cache_pages(client: aioredis.Redis, *conversation_ids: str) -> None:
    await client.mset({page_key(cid, page): "page" for cid in conversation_ids for page in CACHED_PAGES})


@pytest.mark.anyio
async def test_delete_returns_one_then_zero(redis_url: str) -> None:
    async with RedisCache(redis_url) as cache:
        await cache.set("messages:c1:1:50", "page")
        assert await cache.delete("messages:c1:1:50") == 1
        assert await cache.delete("messages:c1:1:50") == 0
        assert cache.commands == 3


@pytest.mark.anyio
async def test_delete_pattern_takes_its_conversation_only(redis_url: str, admin: aioredis.Redis) -> None:
    # c10 starts with c1: the colon after the id in the glob is what keeps c10's pages out of c1's pattern.
    await cache_pages(admin, "c1", "c10", "c2")
    async with RedisCache(redis_url) as cache:
        assert await cache.delete_pattern(conversation_pattern("c1")) == len(CACHED_PAGES)
    left = set(await admin.keys("*"))
    assert left == {page_key(cid, page) for cid in ("c10", "c2") for page in CACHED_PAGES}


@pytest.mark.anyio
async def test_delete_pattern_round_trips(redis_url: str, admin: aioredis.Redis) -> None:
    await cache_pages(admin, "c1")
    async with RedisCache(redis_url) as cache:
        assert await cache.delete_pattern(conversation_pattern("c1")) == len(CACHED_PAGES)
        assert cache.commands == 2  # KEYS, then one DEL of all it found
        assert await cache.delete_pattern(conversation_pattern("c1")) == 0
        assert cache.commands == 3  # KEYS found nothing: no DEL
    assert await admin.dbsize() == 0


@pytest.mark.anyio
async def test_command_delay_is_paid_once_per_round_trip(
    redis_url: str, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    # Recorded, not slept: the test checks which calls pay the delay, not how long they took.
    monkeypatch.setattr(roundtrip, "anyio", SimpleNamespace(sleep=sleep))
    await cache_pages(admin, "c1")
    async with RedisCache(redis_url, command_delay_s=0.05) as cache:
        await cache.set("messages:c2:1:50", "page")
        assert await cache.delete("messages:c2:1:50") == 1
        assert await cache.delete_pattern(conversation_pattern("c1")) == len(CACHED_PAGES)
        assert await cache.delete_pattern(conversation_pattern("c1")) == 0
        assert cache.commands == 5
    assert slept == [0.05] * 5
    slept.clear()
    async with RedisCache(redis_url) as undelayed:
        await undelayed.set("messages:c2:1:50", "page")
        assert undelayed.commands == 1
    assert slept == []


def check_report(report: dict[str, Any], sizes: list[int], repeats: int, with_redis: bool) -> None:
    assert [row["size"] for row in report["results"]] == sizes
    assert report["machine"]["cpus"] >= 1
    for row in report["results"]:
        assert row["conversations"] == row["size"] // len(CACHED_PAGES)
        assert row["repeats"] == repeats
        methods, ratios = row["methods"], row["ratios"]
        assert set(methods) == set(invalidation.METHODS)
        measured = invalidation.METHODS if with_redis else ("evict_prefix", "dict_scan")
        for name in invalidation.METHODS:
            stats = methods[name]
            if name not in measured:
                assert stats is None
                continue
            assert stats["deleted_per_run"] == len(CACHED_PAGES)
            assert stats["samples"] == repeats
            assert 0 < stats["min_us"] <= stats["median_us"] <= stats["p95_us"] <= stats["max_us"]
        assert methods["evict_prefix"]["round_trips"] == 0
        assert ratios["dict_scan_over_evict_prefix"] > 0
        if with_redis:
            assert methods["redis_sequential_del"]["round_trips"] == len(CACHED_PAGES)
            assert methods["redis_keys_del"]["round_trips"] == 2
            assert ratios["sequential_del_over_keys_del"] > 0
            assert ratios["keys_del_over_evict_prefix"] > 0
            assert row["redis_fill_s"] >= 0
        else:
            assert ratios["sequential_del_over_keys_del"] is None
            assert ratios["keys_del_over_evict_prefix"] is None
            assert row["redis_fill_s"] is None


def test_invalidation_run_against_redis(redis_url: str) -> None:
    report = invalidation.run(sizes=[100, 1000], repeats=2, redis_url=redis_url)
    assert report["redis_skipped"] is None
    assert isinstance(report["machine"]["redis_version"], str)
    check_report(report, [100, 1000], 2, with_redis=True)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0  # the sweep leaves its database empty
    finally:
        client.close()


def test_invalidation_run_without_redis() -> None:
    report = invalidation.run(sizes=[100], repeats=2, redis_url=NO_REDIS_URL)
    assert "no Redis answers" in report["redis_skipped"]
    assert report["machine"]["redis_version"] is None
    check_report(report, [100], 2, with_redis=False)


def test_invalidation_refuses_to_time_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PrefixTTLCache, "evict_prefix", lambda self, prefix: 0)
    with pytest.raises(invalidation.NoOpMeasured, match="evict_prefix: the number of keys deleted is 0, not 10"):
        invalidation.run(sizes=[100], repeats=2, redis_url=NO_REDIS_URL)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/0", "redis://h/15?db=0"])
def test_invalidation_refuses_database_zero(url: str) -> None:
    with pytest.raises(ValueError, match="database 0"):
        invalidation.run(sizes=[100], repeats=1, redis_url=url)


@pytest.mark.parametrize("size", [0, 15, -10])
def test_invalidation_refuses_a_size_of_partial_conversations(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 10"):
        invalidation.run(sizes=[size], repeats=1, redis_url=NO_REDIS_URL)
