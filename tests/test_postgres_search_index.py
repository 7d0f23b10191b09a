"""The search index's upkeep on PostgreSQL, on a real server: the server keeps the GIN index complete, so
the functions SQLite needs for its backfill answer "complete" and do nothing, and a rebuild keeps it valid."""

from __future__ import annotations

from pathlib import Path

from storage import search_index as lite_search_index
from storage.connection import open_writer
from storage.migrations import migrate
from storage.postgres import search_index
from storage.postgres.connection import Connection, connect
from storage.postgres.writes import commit_batch as pg_commit_batch
from storage.writes import commit_batch as lite_commit_batch
from tests.test_postgres_writes import append, ready

FOUND = "SELECT count(*) FROM messages WHERE search_document(content) @@ to_tsquery('simple', %s)"
VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'messages_search'::regclass"


def found(conn: Connection, word: str) -> int:
    row = conn.execute(FOUND, (word,)).fetchone()
    return row[0] if row else -1


def test_the_index_is_always_complete_and_follows_every_write(postgres_url: str, tmp_path: Path) -> None:
    lite = open_writer(tmp_path / "transcriptd.db")
    migrate(lite)
    try:
        with connect(postgres_url) as conn:
            assert search_index.last_id(conn) == lite_search_index.last_id(lite) == 0
            batch = [ready("c-a", turns=4), append("c-g", [{"role": "user", "content": "Crème brûlée", "id": "m1"}])]
            lite_commit_batch(lite, batch)
            pg_commit_batch(conn, batch)
            assert search_index.last_id(conn) == lite_search_index.last_id(lite) > 0
            assert search_index.state(conn) == lite_search_index.state(lite)
            assert search_index.state(conn).complete
            assert search_index.step(conn) == lite_search_index.step(lite) == 0
            assert found(conn, "creme") == 1  # folded as unicode61 folds, with no backfill step
            pg_commit_batch(conn, [append("c-g", [{"role": "user", "content": "tarte tatin", "id": "m1"}])])
            assert found(conn, "creme") == 0
            assert found(conn, "tatin") == 1
            # Off is not applied on PostgreSQL: nothing changes, and the index stays complete.
            assert search_index.configure(conn, enabled=False) is False
            assert search_index.configure(conn, enabled=True) is False
            assert search_index.state(conn).complete
            search_index.rebuild(conn)
            assert conn.execute(VALID).fetchone() == (True,)
            assert found(conn, "tatin") == 1
            # The write-time hooks and the delete statement have nothing to do.
            search_index.index_after(conn, 0)
            search_index.reindex(conn, [(1, "old")])
            assert conn.execute(search_index.unindex_where("true")).fetchall() == []
            assert found(conn, "tatin") == 1
    finally:
        lite.close()
