"""The HTTP server under hostile or broken senders: a real ``transcriptd serve``, raw sockets on loopback.

Each test reproduces what was seen against uvicorn alone: an unbounded request head, a Content-Length
lie, silent connections up to the file-descriptor limit, keep-alive requests written while the daemon
was stopped, a sender leaving mid-body. Every wait is bounded by a socket timeout and a count.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.daemon_process import HOST, WEBHOOK, Daemon, managed, start_daemon
from tests.payloads import encode, transcription_ready

pytestmark = pytest.mark.slow

IO_TIMEOUT_S = 15.0  # no answer in this long fails the test instead of hanging it


@contextmanager
def daemon(tmp_path: Path, **settings: str) -> Iterator[Daemon]:
    """A daemon with ``server.*`` settings, e.g. ``header_timeout_s="1"``, through the environment."""
    env = {f"TRANSCRIPTD_SERVER_{name.upper()}": value for name, value in settings.items()}
    with managed(start_daemon(tmp_path, tmp_path / "transcriptd.db", env=env)) as running:
        yield running


def connect(d: Daemon) -> socket.socket:
    sock = socket.create_connection((HOST, d.port), timeout=IO_TIMEOUT_S)
    sock.settimeout(IO_TIMEOUT_S)
    return sock


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: transcriptd.test", *headers, "", ""]).encode()


class Answer(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response with a Content-Length body, read to its end (the connection may stay open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response head; got {data!r}"
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a response body"
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed (EOF, or a reset); False if it sends more instead."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def error_code(answer: Answer) -> str:
    code: str = msgspec.json.decode(answer.body)["error"]["code"]
    return code


def post_transcript(d: Daemon, conversation_id: str) -> int:
    with httpx.Client(base_url=d.base_url, timeout=IO_TIMEOUT_S, trust_env=False) as client:
        body = encode(transcription_ready(conversation_id, turns=20))
        return client.post(WEBHOOK, content=body, headers={"content-type": "application/json"}).status_code


def metric(d: Daemon, name: str) -> float:
    with httpx.Client(timeout=IO_TIMEOUT_S, trust_env=False) as client:
        text = client.get(f"{d.base_url}/metrics").text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- 1. request heads are bounded ---------------------------------------------------------------------


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` from a thread, so the answer can be read while the server drops the rest."""

    def send() -> None:
        # The server may close after answering: the answer is what the test reads.
        with suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_an_oversized_head_gets_431_while_other_senders_are_answered(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        # A head under way, under the limit: it holds only its own connection.
        slow = connect(d)
        slow.sendall(head("POST", WEBHOOK, "X-Padding: " + "p" * 32_000).rstrip(b"\r\n"))
        assert [post_transcript(d, f"meanwhile-{n}") for n in range(5)] == [200] * 5

        for size in (1 << 20, 8 << 20):
            big = connect(d)
            sender = send_in_background(big, head("GET", "/livez", "X-Big: " + "b" * size))
            answer = read_answer(big)
            assert answer.status == 431, answer
            assert error_code(answer) == "header_too_large"
            assert answer.headers["connection"] == "close"
            assert closed_by_server(big)
            sender.join(IO_TIMEOUT_S)
            assert not sender.is_alive(), "the server stopped reading: the sender is stuck"
            big.close()
            assert post_transcript(d, f"after-{size}") == 200

        # The slow head goes over the limit too: 431, and the others were answered all along.
        sender = send_in_background(slow, b"p" * (1 << 20))
        assert read_answer(slow).status == 431
        sender.join(IO_TIMEOUT_S)
        slow.close()
        assert "refused a request head over 65536 bytes" in d.log()


def test_a_head_under_the_limit_is_served(tmp_path: Path) -> None:
    with daemon(tmp_path, max_header_bytes="4096") as d, connect(d) as sock:
        sock.sendall(head("GET", "/livez", "X-Padding: " + "p" * 3_000))
        assert read_answer(sock).status == 200
        # The same connection, next request: its head is counted afresh.
        sock.sendall(head("GET", "/livez", "X-Padding: " + "p" * 3_000))
        assert read_answer(sock).status == 200
        sock.sendall(head("GET", "/livez", "X-Padding: " + "p" * 5_000))
        assert read_answer(sock).status == 431


# --- 2. time limits and the connection limit ----------------------------------------------------------


def test_a_short_content_length_lie_gets_408_and_is_closed(tmp_path: Path) -> None:
    with daemon(tmp_path, body_timeout_s="1") as d:
        for sent in (b"", b'{"conversation_id": "c1", '):
            with connect(d) as sock:
                sock.sendall(head("POST", WEBHOOK, "Content-Type: application/json", "Content-Length: 5000") + sent)
                answer = read_answer(sock)
                assert answer.status == 408, answer
                assert error_code(answer) == "body_timeout"
                assert closed_by_server(sock)
        assert post_transcript(d, "honest") == 200
        assert metric(d, "transcriptd_rejected_requests_total") == 2.0
        assert "reason=body_timeout status=408" in d.log()


def test_an_answer_before_the_body_closes_the_connection_after_it(tmp_path: Path) -> None:
    # /livez takes no POST: 405 goes out before the declared body came. The rest of the body is of no use,
    # and a sender trickling it must not keep the connection: the server half-closes after its answer.
    with daemon(tmp_path, keepalive_timeout_s="60") as d, connect(d) as sock:  # not closed for idleness
        sock.sendall(head("POST", "/livez", "Content-Length: 5000") + b"x" * 10)
        answer = read_answer(sock)
        assert answer.status == 405
        # Said in the answer, so that a keep-alive client does not send its next request into a closing
        # connection (httpx then fails with "Server disconnected without sending a response").
        assert answer.headers.get("connection") == "close", answer.headers
        assert closed_by_server(sock)


def test_silent_connections_are_closed_and_readyz_answers_meanwhile(tmp_path: Path) -> None:
    with daemon(tmp_path, header_timeout_s="1") as d, ExitStack() as stack:
        silent = [stack.enter_context(connect(d)) for _ in range(64)]
        partial = stack.enter_context(connect(d))
        partial.sendall(b"GET /livez HTTP/1.1\r\nHost: transcriptd.test\r\n")
        assert d.readyz() == 200
        # Each is closed by the server (the test's own timeout would fail it otherwise).
        assert all(closed_by_server(sock) for sock in silent)
        answer = read_answer(partial)
        assert answer.status == 408
        assert error_code(answer) == "request_timeout"
        assert closed_by_server(partial)
        assert d.readyz() == 200


def test_past_max_connections_a_request_gets_503_with_retry_after(tmp_path: Path) -> None:
    with daemon(tmp_path, max_connections="4", header_timeout_s="60") as d, ExitStack() as stack:
        held = [stack.enter_context(connect(d)) for _ in range(4)]
        # Served ones answer; a fifth connection is over the limit.
        held[0].sendall(head("GET", "/livez"))
        assert read_answer(held[0]).status == 200
        with connect(d) as extra:
            extra.sendall(head("GET", "/readyz"))
            answer = read_answer(extra)
            assert answer.status == 503, answer
            assert answer.headers["retry-after"] == "1"
            assert error_code(answer) == "too_many_connections"
            assert closed_by_server(extra)
        assert "connection limit reached: 5 open (server.max_connections = 4)" in d.log()
        for sock in held:
            sock.close()
        # Once they are gone, new connections are served again (the server sees the closes soon).
        statuses = []
        for _ in range(100):
            statuses.append(d.readyz())
            if statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses[-1] == 200, statuses


# --- 3. keep-alive across a stall ---------------------------------------------------------------------


def test_keepalive_requests_written_while_the_daemon_was_stopped_are_answered(tmp_path: Path) -> None:
    with daemon(tmp_path, keepalive_timeout_s="1") as d:
        answered = []
        for _ in range(3):  # a few rounds: where the event loop was when stopped varies
            with ExitStack() as stack:
                conns = [stack.enter_context(connect(d)) for _ in range(8)]
                for sock in conns:
                    sock.sendall(head("GET", "/livez"))
                    assert read_answer(sock).status == 200
                d.send(signal.SIGSTOP)
                try:
                    time.sleep(1.5)  # past the keep-alive timeout: every idle timer is due when the daemon wakes
                    for sock in conns:
                        sock.sendall(head("GET", "/livez"))
                finally:
                    d.send(signal.SIGCONT)
                answered.append(sum(read_answer(sock).status == 200 for sock in conns))
                # Idle again, they are closed after the timeout, as before.
                assert all(closed_by_server(sock) for sock in conns)
        assert answered == [8, 8, 8]


# --- 4. a sender leaving mid-body ---------------------------------------------------------------------


def test_a_sender_leaving_mid_body_is_counted_and_logged_in_one_line(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        for _ in range(3):
            with connect(d) as sock:
                sock.sendall(head("POST", WEBHOOK, "Content-Length: 100000") + b'{"conversation_id": ' + b" " * 1000)
                time.sleep(0.2)  # the handler is reading the body when the sender goes
        counted = 0.0
        for _ in range(100):
            counted = metric(d, "transcriptd_client_disconnected_total")
            if counted == 3.0:
                break
            time.sleep(0.05)
        assert counted == 3.0
        assert metric(d, 'transcriptd_rejected_requests_total{reason="internal_error"}') == 0.0
        log = d.log()
        assert log.count("disconnected before its body was read") == 3, log
        assert "Traceback" not in log
        assert "Exception in ASGI application" not in log
