"""A simulated database round trip, applied identically to every system at its driver boundary.

Embedded SQLite answers a statement in-process; a networked database (the write-up's) costs one round
trip per statement before any work is done. The bench adds that cost to both sides the same way: the
naive port's driver sleeps before each awaited statement, and transcriptd's writer connection, built by
:func:`round_trip_connection`, sleeps before each ``execute``/``executemany`` in the writer thread. A
multi-row statement is one round trip, as it is on the wire.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import anyio

DEFAULT_ROUND_TRIP_MS = 1.0


def round_trip_connection(delay_s: float) -> type[sqlite3.Connection]:
    """A ``sqlite3.Connection`` class whose statements each wait ``delay_s`` first (the ``factory`` hook)."""
    if delay_s <= 0:
        return sqlite3.Connection

    class RoundTripConnection(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            time.sleep(delay_s)
            return super().execute(sql, parameters)

        def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
            time.sleep(delay_s)
            return super().executemany(sql, parameters)

    return RoundTripConnection


class RoundTrips:
    """An async client's side of the simulated round trip: each command waits ``command_delay_s`` first
    (not even a zero sleep without one) and is counted in ``commands``, for a bench to report."""

    def __init__(self, command_delay_s: float = 0.0) -> None:
        self.command_delay_s = command_delay_s
        self.commands = 0

    async def _round_trip(self) -> None:
        self.commands += 1
        if self.command_delay_s:
            await anyio.sleep(self.command_delay_s)
