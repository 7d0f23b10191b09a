"""Dead letters: deliveries the database refused, kept with their exact raw body until they are stored.

The writer puts a delivery here when the database refuses its rows (``storage.writes``): its sender is
answered 5xx and may keep retrying, which only bumps ``attempts``. Once the cause is fixed (a trigger, a
constraint, a bug in the parser that produced the rows), ``retry`` parses each stored body again with
the parser intake uses for its source (the same ones ``replay`` uses) and writes it the normal way,
event included, since it was never stored. A stored one is marked ``resolved_at``; one that still fails
stays, with its new error and one more attempt. A delivery its sender re-sent successfully meanwhile is
found already stored, and is resolved as such.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from storage.connection import immediate
from storage.deliveries import Record, WriteResult
from storage.outbox import ChangeSet
from storage.replay import Parse, StoredEvent, parse_stored
from storage.writes import write_in_savepoint


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One unresolved dead letter, without its body (which may hold secrets)."""

    id: int
    delivery_key: str
    source: str
    event_type: str
    conversation_id: str
    received_at: float
    error: str
    failed_at: float
    attempts: int


RetryStatus = Literal["stored", "already_stored", "failed"]


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    id: int
    source: str
    event_type: str
    conversation_id: str
    status: RetryStatus
    inserted: int = 0  # message rows
    error: str | None = None  # why it still fails


@dataclass(slots=True)
class RetrySummary:
    outcomes: list[RetryOutcome] = field(default_factory=list)
    unknown_ids: list[int] = field(default_factory=list)  # asked for, but no unresolved dead letter has it

    @property
    def stored(self) -> list[RetryOutcome]:
        return [o for o in self.outcomes if o.status != "failed"]

    @property
    def failed(self) -> list[RetryOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


LIST_UNRESOLVED = """
SELECT id, delivery_key, source, event_type, conversation_id, received_at, error, failed_at, attempts
FROM dead_letters WHERE resolved_at IS NULL ORDER BY id
"""
_UNRESOLVED_BODIES = """
SELECT id, delivery_key, source, event_type, conversation_id, received_at, body
FROM dead_letters WHERE resolved_at IS NULL
"""
RESOLVE = "UPDATE dead_letters SET resolved_at = ? WHERE id = ?"
STILL_FAILING = "UPDATE dead_letters SET attempts = attempts + 1, error = ?, failed_at = ? WHERE id = ?"


def _exists(conn: sqlite3.Connection) -> bool:
    """A database no daemon of this version has opened yet has no ``dead_letters``: then there are none."""
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'"
    return conn.execute(query).fetchone() is not None


def list_unresolved(conn: sqlite3.Connection) -> list[DeadLetter]:
    """Every unresolved dead letter, oldest first; bodies are not read."""
    if not _exists(conn):
        return []
    return [DeadLetter(*row) for row in conn.execute(LIST_UNRESOLVED)]


def retry(conn: sqlite3.Connection, parsers: Mapping[str, Parse], ids: Iterable[int] | None = None) -> RetrySummary:
    """Parse and store the unresolved dead letters (only ``ids``, if given), oldest first, in one transaction
    with a savepoint each. ``conn`` is in autocommit mode, e.g. ``open_writer``'s.

    ``sqlite3.OperationalError`` (locked past the busy timeout, disk full) rolls everything back and
    propagates: nothing is marked, and retrying again is safe.
    """
    summary = RetrySummary()
    wanted = sorted(set(ids)) if ids is not None else None
    if not _exists(conn):
        summary.unknown_ids = wanted or []
        return summary
    with immediate(conn):
        letters = _unresolved(conn, wanted)
        if wanted is not None:
            found = {event.id for event in letters}
            summary.unknown_ids = [i for i in wanted if i not in found]
        now = time.time()
        changes = ChangeSet()
        for event in letters:
            outcome = _retry_one(conn, parsers, event, changes)
            summary.outcomes.append(outcome)
            if outcome.status == "failed":
                conn.execute(STILL_FAILING, (outcome.error, now, event.id))
            else:
                conn.execute(RESOLVE, (now, event.id))
        changes.record(conn)
    return summary


def _unresolved(conn: sqlite3.Connection, ids: list[int] | None) -> list[StoredEvent]:
    if ids is None:
        rows = conn.execute(_UNRESOLVED_BODIES + " ORDER BY id").fetchall()
    else:
        rows = [row for i in ids for row in conn.execute(_UNRESOLVED_BODIES + " AND id = ?", (i,))]
    return [StoredEvent(*row) for row in rows]


def _retry_one(
    conn: sqlite3.Connection, parsers: Mapping[str, Parse], event: StoredEvent, changes: ChangeSet
) -> RetryOutcome:
    def store(delivery: Record) -> WriteResult | str:
        result = write_in_savepoint(conn, delivery, changes)
        return f"{result.__class__.__name__}: {result}" if isinstance(result, Exception) else result

    return retry_letter(parsers, event, store)


# Write one parsed delivery, event included, in a savepoint of its own: its result, or why the database
# refused it (only it is rolled back then).
StoreOne = Callable[[Record], WriteResult | str]


def retry_letter(parsers: Mapping[str, Parse], event: StoredEvent, store: StoreOne) -> RetryOutcome:
    """Parse one dead letter's body again and hand it to ``store``: what came of it, on either backend."""

    def failed(error: str) -> RetryOutcome:
        return RetryOutcome(event.id, event.source, event.event_type, event.conversation_id, "failed", error=error)

    parse = parsers.get(event.source)
    if parse is None:
        return failed(f"no parser for source {event.source!r}")
    try:
        # Under the key intake computed (a webhook-id header is not stored): the one a re-sent copy is known by.
        delivery = parse_stored(parse, event)
    except Exception as exc:  # whatever the parser raises, this body cannot be parsed now
        return failed(f"the parser refuses it: {exc.__class__.__name__}: {exc}")
    result = store(delivery)
    if isinstance(result, str):
        return failed(f"the database refused it: {result}")
    status: RetryStatus = "already_stored" if result.duplicate_delivery else "stored"
    return RetryOutcome(
        event.id, event.source, event.event_type, event.conversation_id, status, inserted=result.inserted
    )
