"""An app's webhook receiver on loopback, for the outbound webhook tests: a real HTTP server (uvicorn in a
thread) that records every POST and answers as the test scripts it.

``answers`` is a queue of scripted answers taken one per request (status, Retry-After, a delay before
answering); once it is empty the receiver answers ``default`` (200 unless changed). ``down()`` closes the
listening socket (connections are refused), ``up()`` listens again on the same port. Every request's
signature is verified with the Standard Webhooks reference library as it arrives.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.loopback_server import Running, serve_in_thread

# notify.signing_secret of the tests (listed in tests/conftest.py's TEST_SECRETS).
SIGNING_SECRET = "whsec_dHJhbnNjcmlwdGQtdGVzdC1ub3RpZnkta2V5LTE="


@dataclass(frozen=True, slots=True)
class Answer:
    status: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0  # wait this long before answering (past notify.timeout_s: the sender gives up)


@dataclass(frozen=True, slots=True)
class Received:
    at: float  # time.monotonic() when it arrived
    webhook_id: str
    body: dict[str, Any]
    verified: bool  # the signature checked out with the reference library
    status: int  # what the receiver answered


@dataclass
class Receiver:
    secret: str = SIGNING_SECRET
    default: Answer = field(default_factory=Answer)
    answers: deque[Answer] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    # When nothing is scripted: how to answer each request, given its JSON body (None: ``default``), e.g. a
    # flaky receiver.
    chaos: Callable[[dict[str, Any]], Answer] | None = None
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _running: Running | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def script(self, *answers: Answer) -> None:
        with self.lock:
            self.answers.extend(answers)

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def delivered(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.all() if 200 <= r.status < 300]

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """Wait until ``predicate(self)`` holds; fails after ``timeout`` seconds with what was received."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s; received {len(self.all())} requests")
            time.sleep(0.05)

    async def until(self, predicate: Any, timeout: float, what: str) -> None:  # noqa: ASYNC109 (a bound, not a scope)
        """``wait_for`` for a test running on an event loop (the daemon in-process): it keeps running."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s; received {len(self.all())} requests")
            await anyio.sleep(0.05)

    async def _answer(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        with self.lock:
            if self.answers:
                answer = self.answers.popleft()
            else:
                answer = self.chaos(body) if self.chaos is not None else self.default
        if answer.delay_s:
            await anyio.sleep(answer.delay_s)
        try:
            Webhook(self.secret).verify(raw, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            verified = False
        headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else None
        record = Received(time.monotonic(), request.headers.get("webhook-id", ""), body, verified, answer.status)
        with self.lock:
            self.received.append(record)
        return Response(b"", status_code=answer.status, headers=headers)

    def up(self) -> None:
        """Listen (again, on the same port once it had one)."""
        app = Starlette(routes=[Route("/hooks", self._answer, methods=["POST"])])
        self._running = serve_in_thread(app, port=self.port, what="the receiver")
        self.port = self._running.port

    def down(self) -> None:
        """Stop listening: attempts meet a refused connection until ``up()``."""
        if self._running is not None:
            self._running.stop()
            self._running = None


@contextmanager
def receiving(**kwargs: Any) -> Iterator[Receiver]:
    receiver = Receiver(**kwargs)
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.down()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]
