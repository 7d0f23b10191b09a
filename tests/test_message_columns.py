"""The message columns are declared once (storage.deliveries): every row builder puts each value where its
declaration names it, both schemas have every declared column, and a row written by either backend reads
back, column by name, as it was built."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_args

import pytest

from daemon.sources import generic, tavus
from daemon.sources.model import Message, message_rows
from storage.connection import open_writer
from storage.deliveries import (
    APPEND_COLUMNS,
    MESSAGE_COLUMNS,
    VENDOR_MESSAGE_COLUMNS,
    AppendRow,
    MessageRow,
    Record,
    VendorMessageRow,
    vendor_row,
)
from storage.migrations import migrate
from storage.postgres.connection import connect
from storage.postgres.writes import write_batch as pg_write_batch
from storage.replay import replay
from storage.writes import write_batch

NOW = 1_800_000_000.0

# One message, as each builder is given it, and the value each declared column must then hold.
TAVUS_MESSAGE: dict[str, Any] = {
    "conversation_id": "c-tavus",
    "source": "tavus",
    "seq": 0,
    "role": "user",
    "content": "hello",
    "timestamp": 1_700_000_000.5,
    "seconds_from_start": 1.25,
    "duration": 2.5,
    "inference_id": "inf-1",
    "external_id": None,
    "created_at": NOW,
}
VENDOR_MESSAGE: dict[str, Any] = {
    "conversation_id": "c-vendor",
    "source": "vendor",
    "seq": 3,
    "role": "assistant",
    "content": "hi there",
    "timestamp": 1_700_000_001.5,
    "seconds_from_start": 4.5,
    "duration": 0.75,
    "inference_id": None,
    "vendor_role": "bot",
    "external_id": None,
    "created_at": NOW,
}
APPENDED: dict[str, Any] = {
    "conversation_id": "c-api",
    "source": "api",
    "role": "user",
    "content": "appended",
    "timestamp": 1_700_000_002.5,
    "external_id": "m-1",
    "created_at": NOW,
}


def plain(value: Any) -> Any:
    """NULL as the rows hold it for bulk binds (NaN), as None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def by_name(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    return {name: plain(value) for name, value in zip(columns, row, strict=True)}


def tavus_record() -> Record:
    entry = {k: TAVUS_MESSAGE[k] for k in ("role", "content", "timestamp", "seconds_from_start", "duration")}
    entry["inference_id"] = TAVUS_MESSAGE["inference_id"]
    body = {
        "conversation_id": TAVUS_MESSAGE["conversation_id"],
        "event_type": "application.transcription_ready",
        "properties": {"transcript": [entry]},
    }
    record, problems = tavus.parse(json.dumps(body).encode(), {}, received_at=NOW)
    assert not problems
    return record


def vendor_record() -> Record:
    m = VENDOR_MESSAGE
    message = Message(
        seq=m["seq"],
        role="assistant",
        vendor_role=m["vendor_role"],
        content=m["content"],
        timestamp=m["timestamp"],
        seconds_from_start=m["seconds_from_start"],
        duration=m["duration"],
    )
    rows = message_rows(m["conversation_id"], m["source"], [message], NOW)
    return Record(
        key="vendor:1",
        source=m["source"],
        event_type="test",
        conversation_id=m["conversation_id"],
        received_at=NOW,
        body=b"{}",
        rows=rows,
    )


def generic_record() -> Record:
    m = APPENDED
    body = {"role": m["role"], "content": m["content"], "id": m["external_id"], "timestamp": m["timestamp"]}
    record, problems = generic.parse(
        json.dumps(body).encode(), {}, received_at=NOW, conversation_id=m["conversation_id"]
    )
    assert not problems
    return record


@pytest.mark.parametrize(
    ("shape", "columns"),
    [(MessageRow, MESSAGE_COLUMNS), (VendorMessageRow, VENDOR_MESSAGE_COLUMNS), (AppendRow, APPEND_COLUMNS)],
)
def test_each_row_type_has_one_item_per_declared_column(shape: Any, columns: tuple[str, ...]) -> None:
    assert len(get_args(shape)) == len(columns)
    assert len(set(columns)) == len(columns)


def test_each_row_builder_puts_each_value_in_its_declared_column() -> None:
    (tavus_row,) = tavus_record().rows
    assert by_name(MESSAGE_COLUMNS, tavus_row) == TAVUS_MESSAGE
    (vendor,) = vendor_record().rows
    assert by_name(VENDOR_MESSAGE_COLUMNS, vendor) == VENDOR_MESSAGE
    m = VENDOR_MESSAGE
    built = vendor_row(
        m["conversation_id"],
        m["source"],
        m["seq"],
        m["role"],
        m["content"],
        m["vendor_role"],
        m["created_at"],
        timestamp=m["timestamp"],
        seconds_from_start=m["seconds_from_start"],
        duration=m["duration"],
    )
    assert by_name(VENDOR_MESSAGE_COLUMNS, built) == VENDOR_MESSAGE
    (appended,) = generic_record().append_rows
    assert by_name(APPEND_COLUMNS, appended) == APPENDED


def stored(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    return {row[0]: by_name(VENDOR_MESSAGE_COLUMNS, row) for row in rows}


SELECT_MESSAGES = f"SELECT {', '.join(VENDOR_MESSAGE_COLUMNS)} FROM messages"  # noqa: S608 (constants only)
EXPECTED: dict[str, dict[str, Any]] = {
    "c-tavus": {**TAVUS_MESSAGE, "vendor_role": None},
    "c-vendor": VENDOR_MESSAGE,
    "c-api": {
        **APPENDED,
        "seq": 0,
        "seconds_from_start": None,
        "duration": None,
        "inference_id": None,
        "vendor_role": None,
    },
}


def test_sqlite_stores_every_shape_column_by_column_and_replay_puts_appends_back_as_they_were(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "columns.db")
    try:
        migrate(conn)
        schema = {name for _, name, *_ in conn.execute("PRAGMA table_info(messages)")}
        assert set(VENDOR_MESSAGE_COLUMNS) <= schema
        write_batch(conn, [tavus_record(), vendor_record(), generic_record()])
        assert stored(conn.execute(SELECT_MESSAGES).fetchall()) == EXPECTED
        # Replay places the appended message itself (a MessageRow built from its AppendRow): were a column
        # out of place, the stored row would be rewritten with it.
        stats = replay(conn, {"api": generic.replay, "tavus": tavus.SOURCE.replay})
        assert stats.events == 2
        assert stats.failed == 0
        assert stored(conn.execute(SELECT_MESSAGES).fetchall()) == EXPECTED
    finally:
        conn.close()


def test_postgresql_stores_every_shape_column_by_column(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        schema = {
            name
            for (name,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"
                " AND table_schema = current_schema()"
            )
        }
        assert set(VENDOR_MESSAGE_COLUMNS) <= schema
        pg_write_batch(conn, [tavus_record(), vendor_record(), generic_record()])
        assert stored(conn.execute(SELECT_MESSAGES).fetchall()) == EXPECTED
