from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from starlette.applications import Starlette

from daemon.app import create_app
from daemon.config import Config, load_config
from storage.backend import is_postgres_url
from storage.portable import fetch_all
from tests.daemon_process import rows

if TYPE_CHECKING:
    from tests.postgres_tools import SchemaPool

# Every secret the tests configure or send. New tests must take their secrets from this list: the
# session-wide check below fails the run if any of them appears in a log record or a daemon's log file.
TEST_SECRETS: tuple[str, ...] = (
    "t0ken-Secret-1234",  # webhooks.tavus.token (tests/test_intake.py)
    "read-s3cret",  # api.token (tests/test_api.py)
    "metr1cs-s3cret",  # api.metrics_token (tests/test_secure_defaults.py)
    "s3cr3t-callback-token",  # the token in the webhook_url every Tavus body echoes (bench/payloads.py)
    "from-env",  # TRANSCRIPTD_WEBHOOKS_TAVUS_TOKEN (tests/test_config.py)
    "whsec_dHJhbnNjcmlwdGQtdGVzdC1zaWduaW5nLWtleS0x",  # webhooks.tavus.signing_secret (tests/test_signatures.py)
    "whsec_dHJhbnNjcmlwdGQtdGVzdC1zaWduaW5nLWtleS0y",  # its rotation partner (tests/test_signatures.py)
    "wsec_transcriptd-test-elevenlabs-1",  # webhooks.elevenlabs.signing_secret (tests/test_elevenlabs*.py)
    "wsec_transcriptd-test-elevenlabs-2",  # its rotation partner (tests/test_elevenlabs*.py)
    "key_retell-e2e-5a7c",  # webhooks.retell.api_key (tests/test_retell_webhook.py)
    "key_retell-rotated-9d2e",  # its rotation partner (tests/test_retell_webhook.py)
    "tavus-api-k3y-Secret",  # webhooks.tavus.api_key (tests/vendor_standin.py)
    "vapi-private-k3y-Secret",  # webhooks.vapi.api_key (tests/vendor_standin.py)
    "elevenlabs-xi-k3y-Secret",  # webhooks.elevenlabs.api_key (tests/vendor_standin.py)
    "whsec_dHJhbnNjcmlwdGQtdGVzdC1ub3RpZnkta2V5LTE=",  # notify.signing_secret (tests/receiver.py)
)
# The tests' own HTTP client logs every URL it requests, token included: that is the test talking, not the
# daemon, and it is left out of the check.
CLIENT_LOGGERS = ("httpx", "httpcore")


def leaked_lines(text: str, secrets: Iterable[str] = TEST_SECRETS) -> list[str]:
    """The lines of ``text`` that hold one of ``secrets``."""
    secrets = tuple(secrets)
    return [line for line in text.splitlines() if any(secret in line for secret in secrets)]


def leaks_in_log_files(directory: Path, secrets: Iterable[str] = TEST_SECRETS) -> list[str]:
    """Every line holding a secret in the ``*.log`` files under ``directory`` (the daemons' logs), by file."""
    leaks: list[str] = []
    for path in sorted(directory.rglob("*.log")):
        text = path.read_text(encoding="utf-8", errors="replace")
        leaks.extend(f"{path}: {line}" for line in leaked_lines(text, secrets))
    return leaks


class SecretLeakCapture(logging.Handler):
    """Formats every record that reaches it as text, and keeps the ones holding a secret, with the test."""

    def __init__(self, secrets: Iterable[str] = TEST_SECRETS) -> None:
        super().__init__(logging.NOTSET)
        self.secrets = tuple(secrets)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.records = 0
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in CLIENT_LOGGERS:
            return
        self.records += 1
        test = os.environ.get("PYTEST_CURRENT_TEST", "outside any test")
        self.leaks.extend(f"{test}: {line}" for line in leaked_lines(self.format(record), self.secrets))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fails the session if a configured secret was logged: in any record, or in any daemon's log file."""
    capture = SecretLeakCapture()
    root = logging.getLogger()
    level = root.level
    # Every record, debug ones included, is emitted and checked (a test may still raise the level for itself).
    root.setLevel(logging.DEBUG)
    root.addHandler(capture)
    try:
        yield
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    leaks = capture.leaks + leaks_in_log_files(tmp_path_factory.getbasetemp())
    assert not leaks, "a secret of TEST_SECRETS was logged:\n" + "\n".join(leaks[:20])


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite and the writer's threads are asyncio-only; no trio matrix.
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "transcriptd.db"


# --- the storage every test that stores runs on: SQLite, and PostgreSQL ----------------------------------

BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=(*BACKENDS, "both"),
        default="both",
        help="run the storage tests on this backend only (default: both)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``storage`` (directly, or through ``app_client``, ``db``, ``target``...) runs once
    per backend, unless marked ``sqlite_only("why")``; ``module_storage`` likewise, once per module."""
    for name, scope in (("storage", "function"), ("module_storage", "module")):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _backends(metafunc), indirect=True, scope=scope)  # type: ignore[arg-type]


def _backends(metafunc: pytest.Metafunc) -> list[Any]:
    marker = metafunc.definition.get_closest_marker("sqlite_only")
    if marker is not None and not (marker.args or marker.kwargs.get("reason")):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: sqlite_only needs a reason")
    chosen = metafunc.config.getoption("--backend")
    backends: list[Any] = [b for b in BACKENDS if chosen in ("both", b)]
    if marker is not None:
        backends = [b for b in backends if b == "sqlite"]
    if not backends:
        # The run asked for PostgreSQL only, and this test is SQLite's alone.
        return [pytest.param("sqlite", marks=pytest.mark.skip(reason=f"sqlite_only: {_reason(marker)}"))]
    return backends


def _reason(marker: pytest.Mark | None) -> str:
    if marker is None:
        return ""
    return str(marker.args[0] if marker.args else marker.kwargs.get("reason", ""))


Rows = list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Storage:
    """Where one test stores: a SQLite file, or a migrated PostgreSQL schema of its own (``target`` is the
    path or the URL, what ``storage.url`` and ``serve --db`` take)."""

    backend: str
    target: str

    @property
    def postgres(self) -> bool:
        return self.backend == "postgresql"

    def config(self, **settings: Any) -> Config:
        return make_config(self.target, **settings)

    def refuses(self, *values: Any) -> bool:
        """Whether this backend refuses to store text found in ``values`` (strings, in lists and dicts at any
        depth): PostgreSQL's text cannot hold U+0000, so such a delivery is refused and dead-lettered
        (docs/postgresql.md); SQLite stores it."""
        return self.postgres and any("\x00" in text for text in texts_in(values))

    def refused(self, response: httpx.Response, *values: Any) -> bool:
        """True if ``response`` is this backend's documented refusal of text in ``values`` (see ``refuses``):
        the caller then expects nothing stored. Any other answer is left to the caller's checks."""
        if response.status_code < 500 or not self.refuses(*values):
            return False
        assert response.json()["error"]["code"] == "storage_rejected", response.text
        return True

    def query(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """``sql`` (SQLite's ``?`` placeholders) on a connection of its own: rows as tuples, bodies as bytes."""
        return rows(self.target, sql, params)

    def execute(self, script: str) -> None:
        execute(self.target, script)


def texts_in(value: Any) -> Iterator[str]:
    """Every string in ``value``: itself, or the keys and items of its dicts and lists, at any depth (without
    recursion: the fuzzers' bodies nest deeper than Python's stack)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)


def execute(target: Path | str, script: str) -> None:
    """Run ``script`` (statements without parameters, DDL included) on the database ``target`` names, and
    commit it, as an operator would."""
    target = str(target)
    if is_postgres_url(target):
        from storage.postgres.connection import connect as connect_postgres

        with connect_postgres(target) as pg:
            pg.execute(script.encode())
        return
    with closing(sqlite3.connect(target, isolation_level=None)) as conn:
        conn.executescript(script)


@contextmanager
def locked(target: Path | str) -> Iterator[None]:
    """Another process holding the database: no write transaction can commit while it is held (reads go on).

    SQLite: an exclusive transaction on the file. PostgreSQL: a transaction holding every table of the schema
    in EXCLUSIVE mode (which lets plain reads through, as SQLite's WAL does)."""
    target = str(target)
    if is_postgres_url(target):
        from storage.postgres.connection import connect as connect_postgres

        with connect_postgres(target, application_name="transcriptd tests: lock holder") as pg:
            tables = [
                row[0] for row in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            ]
            pg.execute("BEGIN")
            pg.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                pg.execute("ROLLBACK")
        return
    with closing(sqlite3.connect(target, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


@pytest.fixture(scope="session")
def schema_pool(postgres_database: str) -> SchemaPool:
    from tests.postgres_tools import SchemaPool

    return SchemaPool(postgres_database)


@pytest.fixture
def storage(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Storage]:
    """The test's storage, one backend per parametrized run (see pytest_generate_tests)."""
    if request.param == "sqlite":
        yield Storage("sqlite", str(db_path))
        return
    pool: SchemaPool = request.getfixturevalue("schema_pool")
    with pool.schema() as url:
        yield Storage("postgresql", url)


@pytest.fixture(scope="module")
def module_storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """The storage one module's tests share (a daemon started once for them), once per backend."""
    if request.param == "sqlite":
        yield Storage("sqlite", str(tmp_path_factory.mktemp("module") / "transcriptd.db"))
        return
    pool: SchemaPool = request.getfixturevalue("schema_pool")
    with pool.schema() as url:
        yield Storage("postgresql", url)


@pytest.fixture
def target(storage: Storage) -> str:
    """The storage target: a SQLite path or a PostgreSQL URL (``--db``, ``storage.url``)."""
    return storage.target


def make_config(target: Path | str, **settings: Any) -> Config:
    """A Config on ``target`` (a SQLite path or a postgresql:// URL); ``settings`` are dotted names, e.g.
    ``{"ingest.ack": "enqueued"}``."""
    where = {"storage.url": str(target)} if is_postgres_url(str(target)) else {"storage.path": str(target)}
    return load_config(Path("/dev/null"), environ={}, overrides={**where, **settings})


AppClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def app_client(storage: Storage) -> AppClient:
    """The real app in-process, lifespan and all, over ASGI: ``async with app_client(**settings) as client``."""

    @asynccontextmanager
    async def open_client(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        app: Starlette = create_app(storage.config(**settings))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
        ):
            client.app = app  # type: ignore[attr-defined]
            yield client

    return open_client


Query = Callable[..., Rows]


@pytest.fixture
def db(storage: Storage) -> Iterator[Query]:
    """Query the test's database directly, as an operator would: SQLite's ``?`` placeholders on either
    backend, rows as tuples."""
    conns: list[Any] = []

    def query(sql: str, params: Sequence[Any] = ()) -> Rows:
        if not conns:
            if storage.postgres:
                from storage.postgres.connection import connect as connect_postgres

                conns.append(connect_postgres(storage.target))
            else:
                conns.append(sqlite3.connect(storage.target))
        return fetch_all(conns[0], sql, params)

    yield query
    for conn in conns:
        conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One PostgreSQL database for the session (tests/postgres_tools.py): fails, never skips, without a server."""
    from tests.postgres_tools import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A migrated schema of its own for one test: the URL its connections use."""
    from tests.postgres_tools import fresh_schema

    with fresh_schema(postgres_database) as url:
        yield url
