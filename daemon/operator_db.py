"""The database an operator command works on: the configured file, which must exist (an operator command
never creates one), opened as the daemon's writer opens it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.config import Config
from storage.connection import open_writer


def missing(config: Config) -> str | None:
    """Why there is no database to work on (one line), or None when the configured file is there."""
    path = Path(config.storage.target)
    return None if path.is_file() else f"no database at {path} (set --db, or storage.path in the config)"


def writer(config: Config) -> sqlite3.Connection:
    """A writing connection to the configured database, with the daemon's storage settings."""
    return open_writer(
        Path(config.storage.target),
        synchronous=config.storage.synchronous,
        cache_size_mib=config.storage.cache_size_mib,
        busy_timeout_ms=config.storage.busy_timeout_ms,
    )
