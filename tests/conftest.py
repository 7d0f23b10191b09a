from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from daemon.app import create_app
from daemon.config import Config, load_config

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


def make_config(db_path: Path, **settings: Any) -> Config:
    """A Config on a temp database; ``settings`` are dotted names, e.g. ``{"ingest.ack": "enqueued"}``."""
    return load_config(Path("/dev/null"), environ={}, overrides={"storage.path": str(db_path), **settings})


AppClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def app_client(db_path: Path) -> AppClient:
    """The real app in-process, lifespan and all, over ASGI: ``async with app_client(**settings) as client``."""

    @asynccontextmanager
    async def open_client(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        app: Starlette = create_app(make_config(db_path, **settings))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
        ):
            client.app = app  # type: ignore[attr-defined]
            yield client

    return open_client


@pytest.fixture
def db(db_path: Path) -> Iterator[Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Query the database file directly, as an operator would."""
    conns: list[sqlite3.Connection] = []

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not conns:
            conns.append(sqlite3.connect(db_path))
        return conns[0].execute(sql, params).fetchall()

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
