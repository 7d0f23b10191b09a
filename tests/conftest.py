from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from daemon.app import create_app
from daemon.config import Config, load_config


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
