"""A deliberately thin HTTP/1.1 client on asyncio streams: pre-encoded requests over keep-alive connections.

The load generator shares the machine with the daemon, so it must cost as little CPU per request as
possible, or it measures itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Answer:
    status: int
    latency_s: float
    body: bytes


@dataclass(slots=True)
class Connection:
    host: str
    port: int
    _reader: asyncio.StreamReader | None = field(default=None, init=False)
    _writer: asyncio.StreamWriter | None = field(default=None, init=False)

    async def post(self, path: str, body: bytes) -> Answer:
        return await self.request("POST", path, body)

    async def get(self, path: str) -> Answer:
        return await self.request("GET", path, b"")

    async def request(self, method: str, path: str, body: bytes) -> Answer:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        started = time.perf_counter()
        self._writer.write(head.encode() + body)
        await self._writer.drain()
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        length, close = 0, False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            match name.strip().lower():
                case "content-length":
                    length = int(value)
                case "connection":
                    close = value.strip().lower() == "close"
        payload = await self._reader.readexactly(length)
        latency = time.perf_counter() - started
        if close:
            await self.close()
        return Answer(int(status_line.split()[1]), latency, payload)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):  # the peer may be gone already
                await self._writer.wait_closed()
            self._writer = self._reader = None


async def closed_loop(
    port: int, items: Sequence[T], concurrency: int, call: Callable[[Connection, T], Awaitable[Answer]]
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next item as soon as its last one is answered."""
    queue = list(reversed(items))
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client() -> None:
        connection = Connection("127.0.0.1", port)
        try:
            while queue:
                answer = await call(connection, queue.pop())
                latencies.append(answer.latency_s)
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"seconds": elapsed, "statuses": statuses, "latency_ms": percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict[str, float]:
    """Milliseconds, from latencies in seconds sorted ascending."""

    def at(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    return {
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(1000 * latencies[-1], 2),
        "mean": round(1000 * statistics.fmean(latencies), 2),
    }
