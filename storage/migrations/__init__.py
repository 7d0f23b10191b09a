"""Numbered schema migrations, applied in order at start-up and recorded in the same transaction."""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def in_package(package: str) -> list[Migration]:
    """The migrations shipped in ``package`` (files NNNN_name.sql), by number."""
    found = []
    for entry in resources.files(package).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def available() -> list[Migration]:
    found = in_package(__package__)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def applied(conn: sqlite3.Connection) -> set[int]:
    conn.execute(CREATE_LEDGER)
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply every migration not yet applied; each one and its ledger row commit together.

    Foreign keys are off while a migration runs (SQLite's procedure for rebuilding a table: with them on,
    dropping the old table would cascade into its children), and checked before each commit.
    """
    (foreign_keys,) = conn.execute("PRAGMA foreign_keys").fetchone()
    conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: so set before each BEGIN
    try:
        return _migrate(conn)
    finally:
        conn.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")


def _migrate(conn: sqlite3.Connection) -> list[int]:
    newly = []
    for migration in available():
        if migration.version in applied(conn):
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have just applied it.
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)).fetchone():
                conn.execute("ROLLBACK")
                continue
            # Statement by statement: executescript() would commit our open transaction first.
            for statement in _statements(migration.sql):
                conn.execute(statement)
            if broken := conn.execute("PRAGMA foreign_key_check").fetchall():
                raise RuntimeError(f"migration {migration.version} leaves broken foreign keys: {broken[:3]}")
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        newly.append(migration.version)
    return newly


def _statements(script: str) -> list[str]:
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") or not part.strip() for part in current.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current.strip()[:80]!r}")
    return statements
