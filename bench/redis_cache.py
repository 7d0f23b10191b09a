"""The write-up's cache: a real Redis, driven the way it drove it (one awaited command per call).

Implements :class:`bench.naive.NaiveCache`. ``delete_pattern`` is the write-up's fix, ``KEYS pattern`` then
one ``DEL`` of what it found; ``KEYS`` walks the whole keyspace, which is what the sweep in
``bench.invalidation`` measures against transcriptd's in-process ``evict_prefix``. ``command_delay_s``
adds the same simulated round trip the database side gets, on top of the real loopback one.
"""

from __future__ import annotations

from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bench.roundtrip import RoundTrips

# The bench empties the database it uses: its own, never database 0 where anything else would live.
DEFAULT_URL = "redis://127.0.0.1:6379/15"


def redacted(url: str) -> str:
    """``url`` without its password, for reports and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis_url(url: str) -> None:
    """The bench empties its database: refuse database 0, where anything else would live."""
    # Parsed as the client will parse it (a ``?db=`` query wins over the path); a pool connects lazily.
    if int(aioredis.ConnectionPool.from_url(url).connection_kwargs.get("db", 0)) == 0:
        raise ValueError(f"{redacted(url)} is database 0; give the bench a database of its own, e.g. {DEFAULT_URL}")


async def redis_available(url: str = DEFAULT_URL, timeout_s: float = 0.5) -> str | None:
    """None when a Redis answers PING at ``url``; otherwise why not, for the bench to print as it skips."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"no Redis answers at {url}: {exc}"
    finally:
        await client.aclose()
    return None


class RedisCache(RoundTrips):
    """One connection, one awaited command per call, as the write-up's service used ioredis."""

    def __init__(self, url: str = DEFAULT_URL, *, command_delay_s: float = 0.0) -> None:
        super().__init__(command_delay_s)
        self._client = aioredis.Redis.from_url(url, decode_responses=True, single_connection_client=True)

    async def delete(self, key: str) -> int:
        await self._round_trip()
        return int(await self._client.delete(key))

    async def delete_pattern(self, pattern: str) -> int:
        await self._round_trip()
        keys = await self._client.keys(pattern)
        if not keys:
            return 0
        await self._round_trip()
        return int(await self._client.delete(*keys))

    async def set(self, key: str, value: str) -> None:
        await self._round_trip()
        await self._client.set(key, value)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> RedisCache:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
