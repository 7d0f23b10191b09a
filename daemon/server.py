"""The HTTP server: uvicorn (httptools, uvloop where installed), with its connection handling bounded.

uvicorn alone parses a request head of any size (quadratically: httptools grows a header value by
concatenation), waits forever for a head or a body that does not come, accepts connections until the
process runs out of file descriptors, and closes idle keep-alive connections whose next request arrived
while the event loop was stalled. The protocol here puts a limit and a time on each of those:

- a request head over ``server.max_header_bytes`` gets 431, before the parser is fed more than that;
- a head not complete ``server.header_timeout_s`` after its first byte (or the connection) is closed;
- a body not all in ``server.body_timeout_s`` after its head gets 408 (the app sees the request end,
  with :data:`~daemon.errors.BODY_TIMED_OUT` in its scope, and counts it): one timer per request whose
  body is still coming, where a cancel scope in the handler cost every request ~10-30 us;
- past ``server.max_connections`` a request gets 503 with ``Retry-After``; far past it, the connection
  is closed at once, so the process keeps the descriptors it needs (database, listening socket);
- a keep-alive connection is closed for idleness only if no byte of a new request is waiting unread.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import signal
import socket
import struct
import termios
import threading
import time
from asyncio import Transport
from asyncio.events import TimerHandle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import msgspec
import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from daemon.config import Config
from daemon.errors import BODY_TIMED_OUT

log = logging.getLogger("transcriptd.server")

# Descriptors kept for everything but client connections: the database and its WAL and shm files, the
# readers, the listening socket, logs, the checkpointer and the backup API's files.
FD_RESERVE = 64
# A stalled process (stopped, swapped, a blocking call) can wake to a head waiting unread when its
# timer fires: it gets this long once more to read it.
HEAD_GRACE_S = 1.0
# Between two warnings of the same kind: an attack must not turn into a log flood.
NOTICE_PERIOD_S = 10.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int  # served; past it, 503 + Retry-After
    hard_connections: int  # past it, closed at once: below the open-file limit
    retry_after_s: int


class Notices:
    """Warnings at most once per ``period_s`` per kind, each saying how many happened since the last."""

    def __init__(self, period_s: float = NOTICE_PERIOD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def note(self, kind: str, message: str, *args: object) -> bool:
        """Count one ``kind``; log ``message`` if it is time, with how many there were since. True if logged."""
        count = self._count[kind] = self._count.get(kind, 0) + 1
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.period_s:
            return False
        self._last[kind], self._count[kind] = now, 0
        if last is None:
            log.warning(message, *args)
        else:
            log.warning(message + " (%d times in the last %.0f s)", *args, count, now - last)
        return True


def pending_bytes(transport: Transport) -> int:
    """Bytes received on the connection's socket and not read yet (FIONREAD); 0 if it cannot be told."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    count: int = struct.unpack("i", answer)[0]
    return count


def _error(status: int, code: str, message: str) -> bytes:
    # The shape of every error body (daemon.errors); written by hand because no ASGI app is running.
    return msgspec.json.encode({"error": {"status": status, "code": code, "message": message}})


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


class HardenedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpLimits`; see the module's docstring."""

    limits: ClassVar[HttpLimits]
    notices: ClassVar[Notices]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_left: int | None = self.limits.max_header_bytes  # None: not in a request head
        self._heads = 0  # request heads completed, to tell whether a feed completed one
        self._head_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._head_grace = False
        self._lingering = False

    # --- connections --------------------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits, open_ = self.limits, len(self.connections)
        if open_ > limits.hard_connections:
            self.notices.note(
                "hard", "connection limit: %d open, closing new ones at once (server.max_connections = %d)",
                open_, limits.max_connections,
            )  # fmt: skip
            transport.abort()
            return
        if open_ > limits.max_connections:
            self.notices.note(
                "busy", "connection limit reached: %d open (server.max_connections = %d); answering 503",
                open_, limits.max_connections,
            )  # fmt: skip
            self.app = self._too_many_connections
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    async def _too_many_connections(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        retry_after = str(self.limits.retry_after_s).encode()
        body = _error(503, "too_many_connections", "too many connections; retry after Retry-After seconds")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", retry_after),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # --- request heads: size and time ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the answer is out; what the sender still sends is read and dropped
        self._feed(data)
        # Armed only when a chunk ends inside a body: a body that came with its head costs no timer.
        if self._head_left is None and self._body_timer is None and not self._lingering:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def _feed(self, data: bytes) -> None:
        left = self._head_left
        if left is None:
            super().data_received(data)
            return
        if self._head_timer is None:  # the first bytes of a request on a kept-alive connection
            self._arm_head_timer()
        if len(data) <= left:
            self._head_left = left - len(data)
            super().data_received(data)
            return
        # Feed the parser only what the head may still take: if the head ends inside it, feed the rest.
        heads = self._heads
        self._head_left = 0
        if left:
            super().data_received(data[:left])
        if self.transport.is_closing():
            return
        if self._heads == heads:
            limit = self.limits.max_header_bytes
            self.notices.note("head", "refused a request head over %d bytes (server.max_header_bytes)", limit)
            self._refuse(431, "header_too_large", f"the request head is over {limit} bytes (the limit)")
            return
        self._feed(data[left:])

    def on_headers_complete(self) -> None:
        self._head_left = None
        self._heads += 1
        self._cancel_head_timer()
        self._head_grace = False
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body:
            cycle.send = _closing_if_early(cycle)  # type: ignore[method-assign,assignment]

    def on_message_complete(self) -> None:
        self._head_left = self.limits.max_header_bytes  # what follows is the next request's head
        self._cancel_body_timer()
        super().on_message_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._lingering:
            self.transport.close()
            return
        if not self._head_grace and pending_bytes(self.transport):
            self._head_grace = True
            self._head_timer = self.loop.call_later(HEAD_GRACE_S, self._head_timeout)
            return
        if self._head_left is not None and self._head_left < self.limits.max_header_bytes:
            timeout = self.limits.header_timeout_s
            self._refuse(408, "request_timeout", f"the request head did not arrive within {timeout:g} s")
        else:
            self.transport.close()  # not a byte of a request: nobody to answer

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self._lingering or self._head_left is not None or cycle is None:
            return
        if not self._head_grace and pending_bytes(self.transport):
            self._head_grace = True  # a stall, as for heads: read what is waiting first
            self._body_timer = self.loop.call_later(HEAD_GRACE_S, self._body_timeout)
            return
        if cycle.response_started:
            self.transport.close()  # answered already, and the body never came: nothing to add
            return
        timeout = self.limits.body_timeout_s
        cycle.scope[BODY_TIMED_OUT] = timeout  # type: ignore[literal-required]
        self._answer(408, "body_timeout", f"the body did not all arrive within {timeout:g} s")
        # The handler's receive() now says the request is over; what it answers is dropped.
        cycle.disconnected = True
        cycle.message_event.set()

    # --- keep-alive and the end of a request --------------------------------------------------------

    def timeout_keep_alive_handler(self) -> None:
        # The timer runs before the loop reads its sockets: after a stall a request may be waiting unread.
        # It is read next, and its head timer starts then.
        if pending_bytes(self.transport):
            self.timeout_keep_alive_task = None
            return
        super().timeout_keep_alive_handler()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body came in (413, 401, a route that reads no body): the rest of the
            # body is of no use, and a sender trickling it must not hold the connection forever.
            self.server_state.total_requests += 1
            self._linger()
            return
        super().on_response_complete()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` from here (no request reached the app) and close the connection."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A response to an earlier, pipelined request is under way: no room for another.
            self.transport.close()
            return
        self._answer(status, code, message)

    def _answer(self, status: int, code: str, message: str) -> None:
        body = _error(status, code, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body)
        )
        self._linger()

    def _linger(self) -> None:
        # Closing with unread bytes makes the kernel send a reset, which can destroy the answer before the
        # sender reads it. Half-close instead, drop what still comes, and close at its end (or at a timeout).
        self._lingering = True
        self._unset_keepalive_if_required()
        self._cancel_body_timer()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm_head_timer()


def _closing_if_early(cycle: Any) -> Callable[[Any], Any]:
    """The cycle's send, saying ``connection: close`` in an answer that starts before the request's body is
    all in: ``on_response_complete`` then half-closes the connection, and a keep-alive client told nothing
    would send its next request into it. Set only while a body is still to come: a request that arrived
    whole (nearly every webhook) keeps uvicorn's own send."""
    send = cycle.send

    async def closing_send(message: Any) -> None:
        if message["type"] == "http.response.start" and cycle.more_body:
            cycle.keep_alive = False  # uvicorn then writes "connection: close" in the head
        await send(message)

    return closing_send


def protocol_class(limits: HttpLimits) -> type[HardenedProtocol]:
    """The protocol for one server, with its limits."""

    class Protocol(HardenedProtocol):
        pass

    Protocol.limits = limits
    Protocol.notices = Notices()
    return Protocol


# --- the process ---------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (logged); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("raised the open-file limit from %d to %d", soft, target)
            soft = target
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(max_connections: int, fd_limit: int) -> tuple[int, int]:
    """(served, hard) connection limits under an open-file limit: the hard one keeps FD_RESERVE
    descriptors free; the served one leaves a tenth of the rest for the 503 answers above it."""
    hard = max(2, fd_limit - FD_RESERVE)
    served = min(max_connections, max(1, hard * 9 // 10))
    if served < max_connections:
        log.warning(
            "server.max_connections lowered from %d to %d: the open-file limit is %d",
            max_connections,
            served,
            fd_limit,
        )
    return served, max(hard, served)


def http_limits(config: Config) -> HttpLimits:
    served, hard = connection_limits(config.server.max_connections, raise_fd_limit())
    return HttpLimits(
        max_header_bytes=config.server.max_header_bytes,
        header_timeout_s=config.server.header_timeout_s,
        body_timeout_s=config.server.body_timeout_s,
        max_connections=served,
        hard_connections=hard,
        retry_after_s=config.ingest.retry_after_s,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, exiting 0 after a drain, and telling the app at once that it is stopping.

    ``on_exit`` runs on the event loop as soon as SIGTERM or SIGINT arrives: uvicorn then waits for the
    requests in flight before the lifespan's shutdown, and an open change stream or long-poll is one, so
    the app has to end those itself (daemon.changes_signal.ChangesSignal.close)."""

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.on_exit is not None and self._loop is not None:
            # From a signal handler: only the thread-safe call may touch the loop.
            self._loop.call_soon_threadsafe(self.on_exit)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after its graceful shutdown, which turns a clean drain into death
        # by SIGTERM (or a KeyboardInterrupt traceback). The drain is the whole point: exit 0 after it.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def event_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def build_server(
    config: Config, app: ASGIApp, *, graceful_shutdown_s: int, on_exit: Callable[[], None] | None = None
) -> DrainingServer:
    """The uvicorn server for ``app`` with the limits of ``config`` (and the open-file limit raised);
    ``on_exit`` runs on the loop when a stop signal arrives."""
    limits = http_limits(config)
    return DrainingServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            loop=event_loop(),
            http=protocol_class(limits),
            lifespan="on",
            # The access log would print the webhook path, and with it the token.
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_keep_alive=config.server.keepalive_timeout_s,
            timeout_graceful_shutdown=graceful_shutdown_s,
        ),
        on_exit=on_exit,
    )
