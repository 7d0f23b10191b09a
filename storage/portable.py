"""Plain queries written once for both backends: SQLite's ``?`` placeholders, run on either connection.

Only for small, portable SQL (SELECTs of columns both schemas share); anything that differs between the
backends lives in each backend's own module.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import cache
from typing import Any


@cache
def _format_style(sql: str) -> str:
    # psycopg's placeholders are %s, and a literal % is written %%.
    return sql.replace("%", "%%").replace("?", "%s")


def fetch_all(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (``?`` placeholders) on a sqlite3 or a psycopg connection."""
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(sql, tuple(params)).fetchall()
    return list(conn.execute(_format_style(sql), tuple(params)).fetchall())
