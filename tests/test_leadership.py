"""One replica leads (sends notifications, reconciles) on a shared PostgreSQL; on SQLite the process leads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from daemon.leadership import Leadership
from storage.surface import surface_for

pytestmark = pytest.mark.anyio


def leads(leadership: Leadership) -> bool:
    # A call, not the attribute: each assertion reads the state anew (mypy would narrow an attribute).
    return leadership.leading


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 (the state is another task's plain attribute: polled)
            await anyio.sleep(0.02)


async def test_the_only_process_leads_on_sqlite(tmp_path: Path) -> None:
    leadership = Leadership(surface_for(str(tmp_path / "t.db")))
    assert leadership.leading
    async with anyio.create_task_group() as tg:
        await tg.start(leadership.run)
        assert leadership.leading
        leadership.stop()


async def test_one_replica_leads_and_another_takes_over_when_it_stops(postgres_url: str) -> None:
    first = Leadership(surface_for(postgres_url), retry_s=0.1, check_s=0.1)
    second = Leadership(surface_for(postgres_url), retry_s=0.1, check_s=0.1)
    assert not leads(first)
    assert not leads(second)
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        await wait_until(lambda: first.leading)
        await tg.start(second.run)
        await anyio.sleep(0.5)  # several of its attempts: the lock is held
        assert leads(first)
        assert not leads(second)
        first.stop()
        await wait_until(lambda: second.leading)
        assert not leads(first)
        second.stop()
    assert not leads(second)
