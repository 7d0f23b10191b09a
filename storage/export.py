"""One conversation's transcript as JSON lines or Markdown, read on a read-only connection.

Messages come in stream order: by ``source`` ('api' before 'tavus'), then position (``seq``). System
entries (the persona's prompt) are included and marked: ``"system": true`` in JSON, ``[system]`` in Markdown.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

Format = Literal["jsonl", "markdown"]
FORMATS: tuple[Format, ...] = ("jsonl", "markdown")


@dataclass(frozen=True, slots=True)
class ConversationHead:
    id: str
    source: str
    status: str
    started_at: float | None
    ended_at: float | None
    message_count: int
    last_message_at: float | None
    created_at: float
    updated_at: float


class MessageLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One JSON line of the ``jsonl`` export."""

    conversation_id: str
    source: str
    seq: int
    role: str
    content: str
    timestamp: float | None
    system: bool
    id: str | None = None  # the client's own id, on the generic endpoint


HEAD_COLUMNS = "id, source, status, started_at, ended_at, message_count, last_message_at, created_at, updated_at"
# Read in chunks, each one statement run to its end: a statement left open holds its read transaction,
# and a reader that holds one stops every checkpoint at its snapshot, so the daemon's WAL grows for as long
# as the consumer of the export (a pipe, a slow disk) takes. A chunk ends its transaction at once.
CHUNK_ROWS = 500
MESSAGES = (
    "SELECT source, seq, role, content, timestamp, external_id FROM messages "
    "WHERE conversation_id = ? AND (source, seq) > (?, ?) ORDER BY source, seq LIMIT ?"
)


def conversation(conn: sqlite3.Connection, conversation_id: str) -> ConversationHead | None:
    row = conn.execute(f"SELECT {HEAD_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)).fetchone()  # noqa: S608
    return None if row is None else ConversationHead(*row)


def messages(conn: sqlite3.Connection, conversation_id: str, *, chunk_rows: int = CHUNK_ROWS) -> Iterator[MessageLine]:
    """The conversation's messages in stream order, read ``chunk_rows`` at a time (see ``CHUNK_ROWS``).

    Each chunk is its own snapshot: a message stored during the export shows if it comes after the chunk
    being read, which is the order a live transcript grows in."""
    return paged(
        conversation_id,
        lambda after: conn.execute(MESSAGES, (conversation_id, *after, chunk_rows)).fetchall(),
        chunk_rows,
    )


# One chunk of (source, seq, role, content, timestamp, external_id) rows after a (source, seq).
Chunk = Callable[[tuple[str, int]], Sequence[Sequence[Any]]]


def paged(conversation_id: str, chunk: Chunk, chunk_rows: int) -> Iterator[MessageLine]:
    """The lines of every chunk, each chunk read after the last row of the one before (both backends)."""
    after: tuple[str, int] = ("", -1)  # before every (source, seq): sources are non-empty, seq >= 0
    while True:
        rows = chunk(after)
        for source, seq, role, content, timestamp, external_id in rows:
            yield MessageLine(
                conversation_id=conversation_id,
                source=source,
                seq=seq,
                role=role,
                content=content,
                timestamp=timestamp,
                system=role == "system",
                id=external_id,
            )
        if len(rows) < chunk_rows:
            return
        after = (rows[-1][0], rows[-1][1])


def export(conn: sqlite3.Connection, head: ConversationHead, format: Format) -> Iterator[bytes]:
    """The export, chunk by chunk (UTF-8), to write as it comes."""
    return encoded(head, messages(conn, head.id), format)


def encoded(head: ConversationHead, lines: Iterator[MessageLine], format: Format) -> Iterator[bytes]:
    """``lines`` as the export's bytes (both backends: the same rows give the same bytes)."""
    if format == "jsonl":
        encoder = msgspec.json.Encoder()
        for line in lines:
            yield encoder.encode(line) + b"\n"
        return
    for text in markdown(head, lines):
        yield text.encode("utf-8")


def markdown(head: ConversationHead, lines: Iterator[MessageLine]) -> Iterator[str]:
    yield f"# Conversation {_inline(head.id)}\n\n"
    yield f"- status: {head.status}\n"
    yield f"- source: {head.source}\n"
    yield f"- started: {_when(head.started_at)}\n"
    yield f"- ended: {_when(head.ended_at)}\n"
    yield f"- last message: {_when(head.last_message_at)}\n"
    yield f"- messages: {head.message_count}\n"
    yield f"- created: {_when(head.created_at)}\n"
    yield f"- updated: {_when(head.updated_at)}\n"
    stream = None
    for line in lines:
        if line.source != stream:
            stream = line.source
            yield f"\n## {_inline(stream)} messages\n"
        yield "\n" + message_line(line) + "\n"


def message_line(line: MessageLine) -> str:
    """``**user** (12:01:05): text``, on one line: the content's line breaks become ``<br>``."""
    when = f" ({_clock(line.timestamp)})" if line.timestamp is not None else ""
    mark = " [system]" if line.system else ""
    content = "<br>".join(line.content.splitlines())
    return f"**{_inline(line.role)}**{when}{mark}: {content}"


def _inline(text: str) -> str:
    return " ".join(text.split())


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"  # a sender's timestamp outside the calendar: shown as given


def _clock(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"
