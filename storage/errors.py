"""Storage failures, translated from sqlite3 at the storage boundary."""

from __future__ import annotations


class StorageError(Exception):
    """Base of the failures the storage layer reports to its callers."""


class StorageUnavailable(StorageError):
    """Transient: the database could not commit (disk full, locked, read-only, I/O error). Retry later."""


class StorageRejected(StorageError):
    """The database refused this delivery's rows; the rest of its batch was committed without it."""


class WriterClosed(StorageError):
    """The writer is draining or closed and takes no new work."""
