"""Which backend a storage target names: a ``postgresql://`` URL, or a SQLite file's path.

Kept free of any driver import, so that choosing SQLite (the embedded default) never loads psycopg.
"""

from __future__ import annotations


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def describe(target: str) -> str:
    """``target`` for a message or a log line: a path as it is, a URL as host:port/dbname only (never its
    user or password)."""
    if not is_postgres_url(target):
        return target
    from storage.postgres.connection import where

    return where(target)
