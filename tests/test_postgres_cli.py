"""The operator commands with ``--db postgresql://...``, as real ``transcriptd`` subprocesses on a real server:
the same output as on a SQLite file holding the same deliveries; an unreachable server is one line naming
host:port (never the password) and exit 3; ``backup`` points to ``pg_dump``."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from storage.connection import open_writer
from storage.migrations import migrate
from storage.postgres.connection import connect
from storage.postgres.writes import write_batch as pg_write_batch
from storage.writes import write_batch as sqlite_write_batch
from tests.daemon_process import free_port, transcriptd
from tests.postgres_tools import fresh_schema
from tests.reconcile_tools import FIELDS, MESSAGE_COLUMNS
from tests.reconcile_vendors import CASES
from tests.test_postgres_maintenance import CORRUPT, LOSE
from tests.test_postgres_writes import ready, scenario

pytestmark = pytest.mark.slow

DAY = 86_400.0


@pytest.fixture
def both(postgres_url: str, tmp_path: Path) -> tuple[str, str]:
    """A SQLite file and a PostgreSQL schema holding the same deliveries: their ``--db`` values."""
    path = tmp_path / "transcriptd.db"
    lite = open_writer(path)
    migrate(lite)
    with connect(postgres_url) as pg:
        for batch in scenario():
            sqlite_write_batch(lite, batch)
            pg_write_batch(pg, batch)
    lite.close()
    return str(path), postgres_url


def run(*args: str, cwd: Path) -> Any:
    return transcriptd(*args, cwd=cwd)


@pytest.mark.parametrize("format", ["jsonl", "markdown"])
def test_export_writes_the_same_bytes_as_from_sqlite(both: tuple[str, str], tmp_path: Path, format: str) -> None:
    for cid in ("c-a", "c-g", "c-b"):
        outputs = []
        for i, db in enumerate(both):
            out = tmp_path / f"{cid}-{i}.{format}"
            done = run(
                "export", "--conversation", cid, "--format", format, "--output", str(out), "--db", db, cwd=tmp_path
            )
            assert done.returncode == 0, done.stderr
            outputs.append(out.read_bytes())
        assert outputs[1] == outputs[0]
        assert len(outputs[0].splitlines()) > 3
    to_stdout = [run("export", "--conversation", "c-a", "--db", db, cwd=tmp_path).stdout for db in both]
    assert to_stdout[1] == to_stdout[0]
    assert json.loads(to_stdout[0].splitlines()[0])["conversation_id"] == "c-a"


def test_export_of_an_unknown_conversation_names_the_server_not_the_url(postgres_url: str, tmp_path: Path) -> None:
    done = run("export", "--conversation", "nobody", "--db", postgres_url, cwd=tmp_path)
    assert done.returncode == 1
    assert "no conversation 'nobody' in PostgreSQL 127.0.0.1:5432/" in done.stderr
    assert "search_path" not in done.stderr


def test_replay_rebuilds_and_reports_as_on_sqlite(both: tuple[str, str], tmp_path: Path) -> None:
    path, url = both
    with sqlite3.connect(path, isolation_level=None) as lite:
        lite.execute(CORRUPT)
        lite.execute(LOSE)
    lite.close()
    with connect(url) as pg:
        pg.execute(CORRUPT)
        pg.execute(LOSE)
    lines = []
    for db in both:
        done = run("replay", "--db", db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout)
    assert lines[1] == lines[0]
    assert re.match(r"replayed \d+ events in \d+ transactions: 1 messages inserted, \d+ updated", lines[0])
    with connect(url) as pg:
        assert pg.execute("SELECT count(*) FROM messages WHERE content = 'wrong'").fetchone() == (0,)
    one = [run("replay", "--conversation", "c-g", "--db", db, cwd=tmp_path).stdout for db in both]
    assert one[1] == one[0]
    unknown = run("replay", "--conversation", "nobody", "--db", url, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "no events of conversation 'nobody' in PostgreSQL 127.0.0.1:5432/" in unknown.stderr


def counts(line: str) -> list[str]:
    """The numbers of a prune's line, without the cutoff's time (the two runs are a moment apart)."""
    return re.findall(r"(\d+) (?:conversations|messages|events|transactions)", line)


def test_prune_and_its_dry_run_count_as_on_sqlite(both: tuple[str, str], tmp_path: Path) -> None:
    path, url = both
    # c-a and c-b long ago, the others now.
    aged = f"UPDATE conversations SET updated_at = CASE WHEN id IN ('c-a', 'c-b') THEN 1000 ELSE {time.time()} END"  # noqa: S608 (a number)
    with sqlite3.connect(path, isolation_level=None) as lite:
        lite.execute(aged)
    lite.close()
    with connect(url) as pg:
        pg.execute(aged)
    for args in (("--dry-run",), ()):
        lines = []
        for db in both:
            done = run("prune", "--older-than-days", "1", *args, "--db", db, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            lines.append(done.stdout)
        assert counts(lines[1]) == counts(lines[0])
        assert counts(lines[0])[0] == "2"
    with connect(url) as pg:
        left = [cid for (cid,) in pg.execute("SELECT id FROM conversations ORDER BY id")]
    assert "c-a" not in left
    assert "c-g" in left


def test_dead_letters_list_and_retry_as_on_sqlite(both: tuple[str, str], tmp_path: Path) -> None:
    listed = []
    for db in both:
        done = run("dead-letters", "list", "--json", "--db", db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        listed.append(
            [{k: v for k, v in d.items() if k not in ("error", "failed_at")} for d in json.loads(done.stdout)]
        )
    assert listed[1] == listed[0]
    assert [d["conversation_id"] for d in listed[0]] == ["c-bad", "c-big"]
    retried = []
    for db in both:
        done = run("dead-letters", "retry", "--db", db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        retried.append(done.stdout)
    assert retried[1] == retried[0]
    assert "retried 2 dead letters: 2 stored, 0 still failing" in retried[0]
    after = run("dead-letters", "list", "--db", both[1], cwd=tmp_path)
    assert after.stdout.strip() == "0 unresolved dead letters"


def test_backup_points_to_pg_dump(postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    done = run("backup", str(tmp_path / "copy.dump"), "--db", url, cwd=tmp_path)
    assert done.returncode == 2
    assert "pg_dump --format=custom" in done.stderr
    assert "127.0.0.1:5432/" in done.stderr
    assert "s3cret" not in done.stderr
    assert not (tmp_path / "copy.dump").exists()


UNREACHABLE_COMMANDS = [
    ("export", "--conversation", "c-a"),
    ("replay",),
    ("prune", "--older-than-days", "1"),
    ("dead-letters", "list"),
    ("dead-letters", "retry"),
    ("delete", "--conversation", "c-a"),
    ("notifications", "list"),
    ("search", "rebuild"),
]


@pytest.mark.parametrize("command", UNREACHABLE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_unreachable_server_is_one_line_and_exit_3(command: tuple[str, ...], tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://operator:s3cret@127.0.0.1:{port}/transcripts"
    done = run(*command, "--db", url, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith(f"transcriptd: cannot use PostgreSQL at 127.0.0.1:{port}/transcripts: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "s3cret" not in done.stderr
    assert "operator" not in done.stderr


def test_a_database_that_does_not_exist_is_exit_3_without_the_password(postgres_url: str, tmp_path: Path) -> None:
    head = (
        postgres_url.split("?")[0].rpartition("/")[0].replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    )
    done = run("export", "--conversation", "c-a", "--db", f"{head}/no_such_database_here", cwd=tmp_path)
    assert done.returncode == 3
    assert "127.0.0.1:5432/no_such_database_here" in done.stderr
    assert "does not exist" in done.stderr
    assert "s3cret" not in done.stderr


def test_a_schema_without_the_tables_is_named(postgres_database: str, tmp_path: Path) -> None:
    with fresh_schema(postgres_database, migrated=False) as url:
        done = run("dead-letters", "list", "--db", url, cwd=tmp_path)
    assert done.returncode == 1
    assert "no transcriptd tables at PostgreSQL 127.0.0.1:5432/" in done.stderr


def test_delete_and_undo_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    with connect(postgres_url) as pg:
        pg_write_batch(pg, [ready("c-a", turns=2), ready("c-b", turns=2)])
    done = run("delete", "--conversation", "c-a", "--db", postgres_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with connect(postgres_url) as pg:
        left = pg.execute("SELECT DISTINCT conversation_id FROM messages ORDER BY 1").fetchall()
        assert left == [("c-b",)]
        assert pg.execute("SELECT conversation_id FROM tombstones").fetchall() == [("c-a",)]
        (kinds,) = pg.execute("SELECT kinds FROM changes ORDER BY position DESC LIMIT 1").fetchone() or ("",)
        assert json.loads(kinds) == {"erased": 1}
    again = run("delete", "--conversation", "c-a", "--undo", "--db", postgres_url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    with connect(postgres_url) as pg:
        assert pg.execute("SELECT count(*) FROM tombstones").fetchone() == (0,)


def test_notifications_list_and_retry_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    with connect(postgres_url) as pg:
        pg_write_batch(pg, [ready("c-a", turns=2)])
        (position,) = pg.execute("SELECT max(position) FROM changes").fetchone() or (0,)
        pg.execute(
            "INSERT INTO notifications (receiver, position, conversation_id, started_at, attempts, next_attempt_at,"
            " last_status, last_error, failed_at) VALUES ('https://app.example/hook', %s, 'c-a', %s, 9, 0, 500,"
            " 'HTTP 500', %s)",
            (position, time.time() - 100, time.time()),
        )
    listed = run("notifications", "list", "--failed", "--json", "--db", postgres_url, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "c-a" in listed.stdout
    retried = run("notifications", "retry", "--all-failed", "--db", postgres_url, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    with connect(postgres_url) as pg:
        assert pg.execute("SELECT count(*) FROM notifications WHERE failed_at IS NOT NULL").fetchone() == (0,)


def test_search_rebuild_on_postgresql_reindexes(postgres_url: str, tmp_path: Path) -> None:
    with connect(postgres_url) as pg:
        pg_write_batch(pg, [ready("c-a", turns=2)])
    done = run("search", "rebuild", "--db", postgres_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_reconcile_stores_on_postgresql_what_it_stores_on_sqlite(postgres_url: str, tmp_path: Path) -> None:
    case = CASES[0]
    now = time.time()
    calls = [case.call(i, now - 60 * (i + 2)) for i in range(3)]
    path = tmp_path / "transcriptd.db"
    # The last one was erased here: reconcile leaves it alone on both.
    erased = "INSERT INTO tombstones (conversation_id, deleted_at) VALUES ({}, 1)"
    with closing(open_writer(path)) as lite:
        migrate(lite)
        lite.execute(erased.format("?"), (calls[2].conversation_id,))
    with connect(postgres_url) as pg:
        pg.execute(erased.format("%s"), (calls[2].conversation_id,))
    with case.api() as standin:
        for call in calls:
            standin.conversations[call.conversation_id] = call.record
        for db in (str(path), postgres_url):
            done = transcriptd(
                "reconcile", "--source", case.name, "--since", "3h", "--db", db,
                cwd=tmp_path, timeout=120, env=case.url_env(standin),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "found 3, 2 missing or incomplete here" in done.stdout
            again = transcriptd(
                "reconcile", "--source", case.name, "--since", "3h", "--db", db,
                cwd=tmp_path, timeout=120, env=case.url_env(standin),
            )  # fmt: skip
            assert "found 3, 0 missing or incomplete here" in again.stdout
    conversations = f"SELECT {FIELDS} FROM conversations ORDER BY id"  # noqa: S608 (constant text)
    messages = f"SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY conversation_id, source, seq"  # noqa: S608
    with closing(sqlite3.connect(path)) as lite, connect(postgres_url) as pg:
        for query in (conversations, messages):
            expected = lite.execute(query).fetchall()
            assert pg.execute(query).fetchall() == expected
            assert len(expected) >= 2
        assert calls[2].conversation_id not in str(pg.execute(conversations).fetchall())
