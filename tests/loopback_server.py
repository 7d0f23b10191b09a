"""A real HTTP server for a test's outer edge (a vendor's API, an app's webhook receiver): an ASGI app
served by uvicorn on 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Running:
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT_S)
        self.sock.close()


def serve_in_thread(app: ASGIApp, *, port: int = 0, what: str = "the server") -> Running:
    """Listen on 127.0.0.1:``port`` (0: a free one; the same port again after a stop: SO_REUSEADDR) and
    return once uvicorn has started. A slow answer still pending at the stop is cancelled after a second."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError(f"{what} did not start")
        time.sleep(0.01)
    return Running(server, thread, sock)
