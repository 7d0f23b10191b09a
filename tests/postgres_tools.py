"""A real PostgreSQL for tests: one database per session, one schema per test, and a TCP cutter that drops
a connection at its COMMIT.

The server is the one at ``TRANSCRIPTD_TEST_POSTGRES`` (default: the local one, trust auth). If it cannot
be reached the tests that need it fail, naming it: a run that needs PostgreSQL never skips quietly.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

from storage.postgres.connection import ServerUnreachable, connect
from storage.postgres.migrations import migrate

SERVER_URL = os.environ.get("TRANSCRIPTD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url(server_url: str, dbname: str) -> str:
    head, _, _ = server_url.rpartition("/")
    return f"{head}/{dbname}"


def with_schema(url: str, schema: str) -> str:
    """``url`` with every session's search_path set to ``schema`` (so unqualified tables live there)."""
    return f"{url}?options={quote(f'-c search_path={schema}')}"


@contextmanager
def fresh_database(server_url: str = SERVER_URL) -> Iterator[str]:
    """A new database, byte-ordered like SQLite (LC_COLLATE 'C'), dropped afterwards; its URL."""
    try:
        admin = connect(server_url)
    except ServerUnreachable as exc:
        unreachable = str(exc)
    else:
        unreachable = ""
    if unreachable:
        pytest.fail(
            f"these tests need a PostgreSQL server ({unreachable}); start the local one, or set"
            " TRANSCRIPTD_TEST_POSTGRES",
            pytrace=False,
        )
    name = f"transcriptd_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
        try:
            yield database_url(server_url, name)
        finally:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@contextmanager
def fresh_schema(database: str, *, migrated: bool = True) -> Iterator[str]:
    """A fresh schema in ``database``, with every migration applied unless told otherwise; a URL whose
    sessions work in it. Dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with connect(database) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            url = with_schema(database, schema)
            if migrated:
                with connect(url) as conn:
                    migrate(conn)
            yield url
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


class CommitCutter:
    """A TCP relay on loopback in front of the server that closes both sides when the client sends COMMIT
    (once ``armed``): the client's commit is lost in the network, as when the server's host goes away."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self.target = (host, port)
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> CommitCutter:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            thread = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        with client, server:
            while not self._closing:
                readable, _, _ = select.select([client, server], [], [], 0.2)
                for side in readable:
                    data = side.recv(65536)
                    if not data:
                        return
                    if side is client and self.armed.is_set() and b"COMMIT" in data:
                        self.cut.set()
                        return
                    (server if side is client else client).sendall(data)
