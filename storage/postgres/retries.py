"""Deadlocks and serialization failures on PostgreSQL: the server rolled the transaction back, certainly,
so it is run again whole, a few times, after a short random pause."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from psycopg import errors

from storage.postgres.connection import Connection

# Whole-transaction attempts on a deadlock or serialization failure, with a short random pause between them.
ATTEMPTS = 5
RETRY_PAUSE_S = 0.005

RETRIED = (errors.DeadlockDetected, errors.SerializationFailure)

T = TypeVar("T")


def pause(attempt: int) -> None:
    """Before attempt ``attempt + 1``: random, so two transactions that collided do not collide again."""
    time.sleep(random.uniform(0, RETRY_PAUSE_S * attempt))


def in_transaction(conn: Connection, work: Callable[[], T]) -> T:
    """``work()`` in one transaction on ``conn`` (autocommit, none open), run again whole after a deadlock
    or serialization failure; the last such failure propagates."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with conn.transaction():
                return work()
        except RETRIED:
            if attempt == ATTEMPTS:
                raise
            pause(attempt)
    raise AssertionError("unreachable")
