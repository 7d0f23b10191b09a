"""PostgreSQL translations of storage/migrations, same numbers and names, applied under an advisory lock.

Replicas starting together all call ``migrate``: the session-level advisory lock lets one apply what is
missing while the others wait, then find it applied. Each migration and its ledger row commit together
(PostgreSQL's DDL is transactional), so a migration interrupted half-way leaves nothing behind.
"""

from __future__ import annotations

import time

from storage.migrations import Migration, in_package
from storage.migrations import available as sqlite_available
from storage.postgres.connection import Connection

# pg_advisory_lock's key: any bigint no other application on the database uses; this one spells "trnscrpt".
MIGRATION_LOCK = 0x74726E7363727074

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  double precision NOT NULL
)
"""


def available() -> list[Migration]:
    """The PostgreSQL migrations, checked to match SQLite's one for one (number and name): the two
    backends' schemas move together."""
    found = in_package(__package__)
    ours = [(m.version, m.name) for m in found]
    theirs = [(m.version, m.name) for m in sqlite_available()]
    if ours != theirs:
        raise RuntimeError(f"the PostgreSQL migrations {ours} do not match SQLite's {theirs}")
    return found


def applied(conn: Connection) -> set[int]:
    cursor = conn.execute("SELECT version FROM schema_migrations")
    return {row[0] for row in cursor}


def migrate(conn: Connection) -> list[int]:
    """Apply every migration not yet applied, in order; the versions this call applied.

    ``conn`` is in autocommit mode with no transaction open (the runner issues its own BEGIN / COMMIT).
    """
    migrations = available()
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        conn.execute(CREATE_LEDGER)
        done = applied(conn)
        newly = []
        for migration in migrations:
            if migration.version in done:
                continue
            with conn.transaction():
                # No parameters: psycopg sends the script as one simple query, every statement in it.
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, time.time()),
                )
            newly.append(migration.version)
        return newly
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
