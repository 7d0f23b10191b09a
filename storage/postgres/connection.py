"""PostgreSQL connections: from a ``postgresql://`` URL, with the durability setting applied, and a
one-line reason (host and port, never the password) when the server cannot be reached."""

from __future__ import annotations

from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from storage.backend import is_postgres_url as is_postgres_url  # re-exported: callers name it here too
from storage.errors import StorageUnavailable

Connection = psycopg.Connection[tuple[Any, ...]]
Synchronous = Literal["full", "normal"]

# full: a commit returns once the server has flushed it to its WAL (survives a server crash);
# normal: once it is in the server's memory (a server crash may lose the last few commits, never
# corrupts). The same promise storage.synchronous makes on SQLite.
SYNCHRONOUS_COMMIT: dict[Synchronous, str] = {"full": "on", "normal": "off"}

CONNECT_TIMEOUT_S = 5


class ServerUnreachable(StorageUnavailable):
    """The server cannot be reached or refuses the connection; the message is one line, password-free."""


def where(url: str) -> str:
    """``host:port/dbname`` of ``url``, for messages: never its user or password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable PostgreSQL URL"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or 5432)
    dbname = str(params.get("dbname") or params.get("user") or "postgres")
    return f"{host}:{port}/{dbname}"


def password_of(url: str) -> str | None:
    """The password ``url`` carries, if any (to mask it in logs)."""
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        return None
    return str(password) if password else None


def unreachable(url: str, exc: Exception) -> str:
    """The one line the CLI prints when ``url`` cannot be used: where, and libpq's reason (the end of its
    first line, e.g. "Connection refused" or 'password authentication failed for user "x"')."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    reason = first.rpartition(" failed: ")[2] or first
    password = conninfo_to_dict(url).get("password") if is_postgres_url(url) else None
    if password:
        reason = reason.replace(str(password), "***")
    return f"cannot use PostgreSQL at {where(url)}: {reason}"


def connect(
    url: str, *, synchronous: Synchronous = "full", application_name: str = "transcriptd", autocommit: bool = True
) -> Connection:
    """A connection in autocommit mode (callers issue their own transactions), with ``synchronous_commit``
    set from ``storage.synchronous``. Raises ``ServerUnreachable`` with a one-line message."""
    try:
        # Added to the URL's own options (a search_path, say), not in their place.
        given = conninfo_to_dict(url).get("options") or ""
        options = f"{given} -c synchronous_commit={SYNCHRONOUS_COMMIT[synchronous]}"
        conn = psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=application_name,
            options=options.strip(),
        )
    except psycopg.Error as exc:
        raise ServerUnreachable(unreachable(url, exc)) from None
    return conn
