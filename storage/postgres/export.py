"""One conversation's transcript as JSON lines or Markdown, from PostgreSQL: the same bytes as
storage/export.py writes for the same rows (the lines and their encoding are that module's).

Messages are read in chunks by keyset, each chunk one statement on the autocommit connection: no
snapshot is held for as long as the consumer of the export takes (a held snapshot keeps vacuum from
cleaning up behind every writer).
"""

from __future__ import annotations

from collections.abc import Iterator

from storage.export import CHUNK_ROWS, HEAD_COLUMNS, ConversationHead, Format, MessageLine, encoded, paged
from storage.postgres.connection import Connection

HEAD = f"SELECT {HEAD_COLUMNS} FROM conversations WHERE id = %s"  # noqa: S608 (constant text)
# (source, seq) compared as a row: the key columns are COLLATE "C", byte order as on SQLite.
MESSAGES = (
    "SELECT source, seq, role, content, timestamp, external_id FROM messages "
    "WHERE conversation_id = %s AND (source, seq) > (%s, %s) ORDER BY source, seq LIMIT %s"
)


def conversation(conn: Connection, conversation_id: str) -> ConversationHead | None:
    row = conn.execute(HEAD, (conversation_id,)).fetchone()
    return None if row is None else ConversationHead(*row)


def messages(conn: Connection, conversation_id: str, *, chunk_rows: int = CHUNK_ROWS) -> Iterator[MessageLine]:
    """The conversation's messages in stream order, read ``chunk_rows`` at a time; each chunk is its own
    snapshot, as on SQLite."""
    return paged(
        conversation_id,
        lambda after: conn.execute(MESSAGES, (conversation_id, *after, chunk_rows)).fetchall(),
        chunk_rows,
    )


def export(conn: Connection, head: ConversationHead, format: Format) -> Iterator[bytes]:
    """The export, chunk by chunk (UTF-8), to write as it comes."""
    return encoded(head, messages(conn, head.id), format)
