"""The PostgreSQL server's ceiling for transcript rows, beside the group commit, measured in one run.

The same message rows (100-turn Tavus transcripts, parsed as the daemon parses them), committed in groups
of ``--per-commit`` transcripts, into a fresh database on the server, three ways:

1. ``COPY messages FROM STDIN``: the fastest way rows get into the table (the ceiling);
2. a plain loop of one ``INSERT ... SELECT FROM unnest(...)`` per transcript: set-based SQL, nothing else;
3. transcriptd's group commit (``storage.postgres.writes.write_batch``) driven directly: conversations
   locked and patched, events claimed with their raw bodies, messages counted.

For 1 and 2 the conversation rows (the messages' foreign key) are inserted before the clock starts; the
group commit writes its own. ``synchronous_commit = on`` for all three (``storage.synchronous = full``).
An unreachable server fails the step: a benchmark that skips quietly publishes nothing true.

    python -m bench.pg_ceiling [--url postgresql://postgres@127.0.0.1:5432/postgres] [--transcripts 800]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.ingest_limit import make_bodies
from bench.machine import describe
from daemon.sources import tavus
from storage.deliveries import VENDOR_MESSAGE_COLUMNS, VENDOR_ROLE, VENDOR_ROW_WIDTH, Record
from storage.postgres.connection import Connection, ServerUnreachable, connect
from storage.postgres.migrations import migrate
from storage.postgres.statements import MESSAGE_TYPES, REAL_MESSAGE_COLUMNS
from storage.postgres.writes import write_batch

RESULTS = Path(__file__).parent / "results"
DEFAULT_URL = os.environ.get("TRANSCRIPTD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

MESSAGE_COLUMNS = ", ".join(VENDOR_MESSAGE_COLUMNS)
COPY = f"COPY messages ({MESSAGE_COLUMNS}) FROM STDIN (FORMAT BINARY)"
REALS = [i for i, name in enumerate(VENDOR_MESSAGE_COLUMNS) if name in REAL_MESSAGE_COLUMNS]
COPY_TYPES = [MESSAGE_TYPES[name] for name in VENDOR_MESSAGE_COLUMNS]
ARRAYS = ", ".join(f"%b::{kind}[]" for kind in COPY_TYPES)
UNNEST = f"INSERT INTO messages ({MESSAGE_COLUMNS}) SELECT * FROM unnest({ARRAYS})"  # noqa: S608 (constants)


def columns_of(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Message rows (SQLite's NaN-as-NULL included) as the column arrays the statements take."""
    columns: list[list[Any]] = [[] for _ in range(VENDOR_ROW_WIDTH)]
    for row in rows:
        values = row if len(row) == VENDOR_ROW_WIDTH else (*row[:VENDOR_ROLE], None, *row[VENDOR_ROLE:])
        for column, value in zip(columns, values, strict=True):
            column.append(None if value != value else value)  # NaN is NULL
    for i in REALS:  # binary: a real column takes floats only
        columns[i] = [None if v is None else float(v) for v in columns[i]]
    return columns


def fresh(conn: Connection) -> None:
    conn.execute("TRUNCATE conversations, messages, events, dead_letters, tombstones")


def with_conversations(conn: Connection, deliveries: list[Record]) -> None:
    """The messages' foreign key needs their conversations: inserted before the clock starts."""
    ids = [d.conversation_id for d in deliveries]
    conn.execute(
        "INSERT INTO conversations (id, source, created_at, updated_at)"
        " SELECT id, 'tavus', 0, 0 FROM unnest(%s::text[]) AS id",
        (ids,),
    )


def measured(conn: Connection, started: float, commits: int) -> dict[str, float]:
    elapsed = time.perf_counter() - started
    (rows,) = conn.execute("SELECT count(*) FROM messages").fetchone() or (0,)
    return {
        "rows": rows,
        "commits": commits,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "commits_per_s": commits / elapsed,
    }


def copy_ceiling(conn: Connection, deliveries: list[Record], per_commit: int) -> dict[str, float]:
    fresh(conn)
    return copy_messages(conn, deliveries, per_commit)


def copy_messages(conn: Connection, deliveries: list[Record], per_commit: int) -> dict[str, float]:
    """COPY the deliveries' message rows, ``per_commit`` transcripts per commit, into whatever the table
    holds already; their conversations are inserted before the clock starts."""
    with_conversations(conn, deliveries)
    rows = [list(zip(*columns_of(list(d.rows)), strict=True)) for d in deliveries]
    commits = 0
    started = time.perf_counter()
    for i in range(0, len(rows), per_commit):
        with conn.transaction(), conn.cursor() as cursor, cursor.copy(COPY) as copy:
            copy.set_types(COPY_TYPES)
            for transcript in rows[i : i + per_commit]:
                for row in transcript:
                    copy.write_row(row)
        commits += 1
    elapsed = time.perf_counter() - started
    written = sum(map(len, rows))
    return {
        "rows": written,
        "commits": commits,
        "seconds": elapsed,
        "rows_per_s": written / elapsed,
        "commits_per_s": commits / elapsed,
    }


def unnest_loop(conn: Connection, deliveries: list[Record], per_commit: int) -> dict[str, float]:
    fresh(conn)
    with_conversations(conn, deliveries)
    arrays = [columns_of(list(d.rows)) for d in deliveries]
    commits = 0
    started = time.perf_counter()
    for i in range(0, len(arrays), per_commit):
        with conn.transaction():
            for columns in arrays[i : i + per_commit]:
                conn.execute(UNNEST, columns)
        commits += 1
    return measured(conn, started, commits)


def group_commit(conn: Connection, deliveries: list[Record], per_commit: int) -> dict[str, float]:
    fresh(conn)
    commits = 0
    started = time.perf_counter()
    for i in range(0, len(deliveries), per_commit):
        write_batch(conn, deliveries[i : i + per_commit])
        commits += 1
    return measured(conn, started, commits)


@contextmanager
def scratch_database(url: str, purpose: str = "bench") -> Iterator[str]:
    """The URL of a fresh, migrated database created on ``url``'s server (byte-order collation, as the
    tests use), dropped on the way out, whatever is still connected to it."""
    try:
        admin = connect(url)
    except ServerUnreachable as exc:
        raise SystemExit(f"this bench needs a PostgreSQL server: {exc}") from None
    name = f"transcriptd_{purpose}_{os.getpid()}"
    head, _, _ = url.rpartition("/")
    with admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
        try:
            with connect(f"{head}/{name}") as conn:
                migrate(conn)
            yield f"{head}/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def server_version(conn: Connection) -> str:
    (version,) = conn.execute("SHOW server_version").fetchone() or ("?",)
    return str(version)


def run(url: str, transcripts: int, turns: int, per_commit: int, rounds: int) -> dict[str, Any]:
    with scratch_database(url) as database, connect(database, synchronous="full") as conn:
        version = server_version(conn)
        bodies = make_bodies(transcripts, turns)
        deliveries = [tavus.parse(b, {}, received_at=time.time())[0] for b in bodies]
        results: dict[str, list[dict[str, float]]] = {"copy": [], "unnest": [], "group_commit": []}
        # Alternated rounds, so that the server's state drifts over all three alike; the median is kept.
        for _ in range(rounds):
            results["copy"].append(copy_ceiling(conn, deliveries, per_commit))
            results["unnest"].append(unnest_loop(conn, deliveries, per_commit))
            results["group_commit"].append(group_commit(conn, deliveries, per_commit))
    medians = {what: sorted(runs, key=lambda r: r["rows_per_s"])[len(runs) // 2] for what, runs in results.items()}
    return {
        "settings": {
            "transcripts": transcripts,
            "turns": turns,
            "per_commit": per_commit,
            "rounds": rounds,
            "synchronous_commit": "on",
        },
        "server_version": version,
        "machine": describe(),
        **medians,
        "rounds": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="the server (a database is created on it and dropped)")
    parser.add_argument("--transcripts", type=int, default=800, help="transcripts per round (default 800)")
    parser.add_argument("--turns", type=int, default=100, help="messages per transcript besides the system one")
    parser.add_argument("--per-commit", type=int, default=16, help="transcripts per commit (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds; the median is reported")
    parser.add_argument("--output", type=Path, default=RESULTS / "pg_ceiling.json")
    args = parser.parse_args(argv)
    result = run(args.url, args.transcripts, args.turns, args.per_commit, args.rounds)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for what in ("copy", "unnest", "group_commit"):
        r = result[what]
        print(f"{what:>12}: {r['rows_per_s']:>10,.0f} rows/s {r['commits_per_s']:>8,.1f} commits/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
