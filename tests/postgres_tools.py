"""A real PostgreSQL for tests: one database per session, one schema per test, and a TCP cutter that drops
a connection at its COMMIT.

The server is the one at ``TRANSCRIPTD_TEST_POSTGRES`` (default: the local one, trust auth). If it cannot
be reached the tests that need it fail, naming it: a run that needs PostgreSQL never skips quietly.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from storage.postgres.connection import Connection, ServerUnreachable, connect
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


# --- a server of the test's own ------------------------------------------------------------------------

# The server binaries of the newest PostgreSQL installed (Debian's layout: /usr/lib/postgresql/<major>/bin).
SERVER_BINARIES = sorted(
    Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
)
CLUSTER_START_TIMEOUT_S = 30


class Cluster:
    """A PostgreSQL server of one test's own, in a directory of its own, on a free loopback port: a test
    may stop and start it (an outage) without touching the shared server. Run as the ``postgres`` user
    when the tests run as root (the server refuses to run as root)."""

    def __init__(self, root: Path, port: int) -> None:
        if not SERVER_BINARIES:
            pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin", pytrace=False)
        self.bin = SERVER_BINARIES[-1]
        self.root = root
        self.data = root / "data"
        self.log_path = root / "server.log"
        self.port = port

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(
                f"{argv[0]} exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, PermissionError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def init(self) -> None:
        # --no-sync: a throwaway cluster need not survive the machine losing power.
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"
        )

    def start(self) -> None:
        # Its socket in its own directory (not the shared /var/run/postgresql), TCP on loopback only.
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(CLUSTER_START_TIMEOUT_S),
            "start",
            timeout=CLUSTER_START_TIMEOUT_S + 10,
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown that rolls back open transactions; ``immediate``: as a crash (WAL
        recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A new server, started; stopped and deleted afterwards. Its directory is outside pytest's temporary
    tree, which only root can enter, in one the ``postgres`` user owns."""
    root = Path(tempfile.mkdtemp(prefix="transcriptd-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        cluster = Cluster(root, _free_port())
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running():
                cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SchemaPool:
    """Migrated schemas handed to one test at a time, emptied in between: the suite's PostgreSQL runs cost
    a few DELETEs per test instead of a migration run (half a second) each.

    A schema comes back only if the test left its structure as the migrations made it (no index dropped,
    no table added: the same catalogue fingerprint) and no session still holds a lock in it; otherwise it
    is left in the session's database (dropped with it) and the next test gets a new one.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._free: list[str] = []
        self._fingerprint: dict[str, tuple[Any, ...]] = {}
        self._reset: dict[str, bytes] = {}

    @contextmanager
    def schema(self) -> Iterator[str]:
        """The URL of an empty migrated schema for one test."""
        name = self._free.pop() if self._free else self._create()
        url = with_schema(self.database, name)
        clean = False
        try:
            yield url
            clean = True
        finally:
            if clean and self._emptied(name):
                self._free.append(name)

    def _create(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with connect(self.database, synchronous="normal") as admin:
            admin.execute(f"CREATE SCHEMA {name}")
        with connect(with_schema(self.database, name), synchronous="normal") as conn:
            migrate(conn)
        with connect(self.database) as admin:
            self._fingerprint[name] = self._catalogue(admin, name)
            self._reset[name] = self._reset_statement(admin, name)
        return name

    @staticmethod
    def _catalogue(admin: Connection, schema: str) -> tuple[Any, ...]:
        row = admin.execute(
            "SELECT (SELECT array_agg(c.relname || ':' || c.relkind::text ORDER BY c.relname) FROM pg_class c"
            "        WHERE c.relnamespace = n.oid),"
            "       (SELECT array_agg(p.proname ORDER BY p.proname) FROM pg_proc p WHERE p.pronamespace = n.oid),"
            "       (SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            "        WHERE c.relnamespace = n.oid AND NOT t.tgisinternal)"
            " FROM pg_namespace n WHERE n.nspname = %s",
            (schema,),
        ).fetchone()
        assert row is not None
        return tuple(row)

    @staticmethod
    def _reset_statement(admin: Connection, schema: str) -> bytes:
        """DELETE from every table but the migrations' ledger (referencing tables first, so no foreign key
        is violated), and restart every sequence, so ids start at 1 again as in a new schema."""
        tables = [
            row[0]
            for row in admin.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'schema_migrations'",
                (schema,),
            )
        ]
        references = admin.execute(
            "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c"
            " JOIN pg_namespace n ON n.oid = c.connamespace WHERE c.contype = 'f' AND n.nspname = %s",
            (schema,),
        ).fetchall()
        referenced_by = {
            t: {src.rpartition(".")[2] for src, dst in references if dst.rpartition(".")[2] == t} for t in tables
        }
        ordered: list[str] = []
        while len(ordered) < len(tables):
            ready = [t for t in tables if t not in ordered and referenced_by[t] <= {*ordered, t}]
            assert ready, f"a cycle of foreign keys among {tables}"
            ordered.extend(sorted(ready))
        sequences = [
            row[0] for row in admin.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = %s", (schema,))
        ]
        # The names come from the catalogue, not from input.
        statements = [f"DELETE FROM {schema}.{table}" for table in ordered]  # noqa: S608
        statements += [f"ALTER SEQUENCE {schema}.{sequence} RESTART" for sequence in sequences]
        return ";\n".join(statements).encode()

    def _emptied(self, schema: str) -> bool:
        try:
            with connect(self.database, synchronous="normal") as admin:
                if self._catalogue(admin, schema) != self._fingerprint[schema]:
                    return False
                # A session the test left in a transaction would hold its rows: give up on the schema
                # rather than wait for it.
                admin.execute("SET lock_timeout = '2s'")
                with admin.transaction():
                    admin.execute(self._reset[schema])
        except psycopg.Error:
            return False
        return True
