"""What reconcile's tests share: feeding webhooks to an in-process app on a database of their own, and
what two databases must agree on after a webhook path and a reconcile path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from daemon.app import create_app
from tests.conftest import make_config
from tests.daemon_process import rows

# The conversation fields both paths must converge on (created_at and updated_at are when *this*
# database saw it, so they differ by design).
FIELDS = (
    "id, source, status, replica_id, shutdown_reason, started_at, ended_at, message_count, last_message_at, "
    "recording_uri, recording_provider, recording_duration, recording_error, perception_analysis, "
    "perception_unavailable_reason, end_reason, analysis"
)
# Every message column but created_at (when this database stored it).
MESSAGE_COLUMNS = (
    "conversation_id, source, seq, role, content, timestamp, seconds_from_start, duration, inference_id, "
    "vendor_role, external_id"
)


async def post_webhooks(
    db_path: Path | str,
    path: str,
    bodies: Iterable[bytes],
    *,
    settings: dict[str, Any] | None = None,
    sign: Callable[[bytes], dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """POST each body to ``path`` of the real app on ``db_path`` (in-process, lifespan and all), signed by
    ``sign`` if given; the answers."""
    app = create_app(make_config(db_path, **(settings or {})))
    answers: list[dict[str, Any]] = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://transcriptd.test") as client,
    ):
        for body in bodies:
            extra = sign(body) if sign is not None else {}
            response = await client.post(path, content=body, headers={"content-type": "application/json", **extra})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    return answers


def snapshot(db_path: Path | str, ids: Iterable[str]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(conversations, messages) of ``ids``, in a fixed order (a SQLite file or a PostgreSQL URL)."""
    wanted = sorted(ids)
    marks = ", ".join("?" * len(wanted))
    conversations = rows(
        db_path,
        f"SELECT {FIELDS} FROM conversations WHERE id IN ({marks}) ORDER BY id",  # noqa: S608
        wanted,
    )
    messages = rows(
        db_path,
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id IN ({marks}) "  # noqa: S608
        "ORDER BY conversation_id, source, seq",
        wanted,
    )
    return conversations, messages


def count(db_path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> int:
    ((value,),) = rows(db_path, sql, params)
    return int(value)
