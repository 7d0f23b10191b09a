"""HTTP to a vendor's API, for reconcile: every request timed out, retried and bounded.

A 429 waits for its ``Retry-After`` (capped); a 5xx, a timeout or a network error backs off
exponentially, with jitter; any other 4xx fails at once (a wrong key does not get better by asking
again). At most ``max_concurrency`` requests are in flight per client. The API key travels in a header
only: it is never part of a URL, an error message or a log line.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
import msgspec

log = logging.getLogger("transcriptd.reconcile")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    timeout_s: float = 10.0  # each request, connect to last byte
    max_attempts: int = 5  # per request, the first included
    max_concurrency: int = 4  # requests in flight to one vendor
    backoff_s: float = 0.5  # the first wait after a 5xx or a network error; doubles, with jitter
    max_wait_s: float = 30.0  # the longest wait between two attempts, Retry-After included


class VendorApiError(Exception):
    """The vendor's API did not give what was asked. The message names the vendor, the request and the
    cause (status or error class), never the key."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable  # a later pass may succeed (outage, rate limit), unlike a 401 or 404


@dataclass(slots=True)
class HttpStats:
    requests: int = 0  # every attempt sent
    retries: int = 0
    rate_limited: int = 0  # 429s answered


class VendorHttp:
    """One vendor's API: a base URL, the headers that carry its key, and the policy above."""

    def __init__(
        self,
        source: str,
        base_url: str,
        headers: Mapping[str, str],
        policy: HttpPolicy | None = None,
    ) -> None:
        self.source = source
        self.policy = policy or HttpPolicy()
        self.stats = HttpStats()
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=dict(headers),
            timeout=self.policy.timeout_s,
            follow_redirects=False,  # a redirect to another host would take the key header with it
        )
        self._limiter = anyio.CapacityLimiter(self.policy.max_concurrency)

    async def __aenter__(self) -> VendorHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, path: str, type_: type[T], params: Mapping[str, Any] | None = None) -> T:
        return self.decode(await self.request("GET", path, params=params), type_, f"GET {path}")

    async def post(self, path: str, type_: type[T], body: Any) -> T:
        return self.decode(await self.request("POST", path, json=body), type_, f"POST {path}")

    def decode(self, content: bytes, type_: type[T], what: str) -> T:
        try:
            return msgspec.json.decode(content, type=type_, strict=False)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise VendorApiError(f"{self.source} API {what}: the answer is not JSON") from None
        except msgspec.ValidationError as exc:
            raise VendorApiError(f"{self.source} API {what}: unexpected answer: {exc}") from None

    async def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None
    ) -> bytes:
        """The body of a 2xx answer, after retries; raises ``VendorApiError`` otherwise."""
        what = f"{self.source} API {method} {path}"
        content = None if json is None else msgspec.json.encode(json)
        headers = None if content is None else {"content-type": "application/json"}
        for attempt in range(1, self.policy.max_attempts + 1):
            last = attempt == self.policy.max_attempts
            async with self._limiter:
                self.stats.requests += 1
                try:
                    response = await self._client.request(
                        method, path, params=_params(params), content=content, headers=headers
                    )
                except httpx.TransportError as exc:  # refused, reset, timed out
                    if last:
                        raise VendorApiError(
                            f"{what}: {exc.__class__.__name__} after {attempt} attempts", retryable=True
                        ) from None
                    wait = self._backoff(attempt)
                    log.warning("%s: %s; retrying in %.1f s", what, exc.__class__.__name__, wait)
                else:
                    status = response.status_code
                    if 200 <= status < 300:
                        return response.content
                    if status != 429 and status < 500:
                        raise VendorApiError(f"{what}: HTTP {status}", status=status)
                    if last:
                        raise VendorApiError(
                            f"{what}: HTTP {status} after {attempt} attempts", status=status, retryable=True
                        )
                    if status == 429:
                        self.stats.rate_limited += 1
                        wait = retry_after(response.headers.get("retry-after"), self._backoff(attempt))
                        wait = min(wait, self.policy.max_wait_s)
                    else:
                        wait = self._backoff(attempt)
                    log.warning("%s: HTTP %d; retrying in %.1f s", what, status, wait)
            self.stats.retries += 1
            # Outside the limiter: a request waiting out a 429 does not hold a slot others could use.
            await anyio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.policy.max_wait_s, self.policy.backoff_s * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # jitter: many clients do not retry in step


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; ``default`` if absent
    or unreadable."""
    if not value:
        return default
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def _params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {name: value for name, value in params.items() if value is not None}
