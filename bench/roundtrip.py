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

DEFAULT_ROUND_TRIP_MS = 1.0


def round_trip_connection(delay_s: float) -> type[sqlite3.Connection]:
    """A ``sqlite3.Connection`` class whose statements each wait ``delay_s`` first (the ``factory`` hook)."""
    if delay_s <= 0:
        return sqlite3.Connection

    class RoundTripConnection(sqlite3.Connection):
        round_trips = 0

        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            time.sleep(delay_s)
            type(self).round_trips += 1
            return super().execute(sql, parameters)

        def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
            time.sleep(delay_s)
            type(self).round_trips += 1
            return super().executemany(sql, parameters)

    return RoundTripConnection
