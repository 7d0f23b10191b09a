"""Dead letters on PostgreSQL: storage/dead_letters.py's ``list_unresolved`` and ``retry``.

``retry`` parses each stored body again and writes it with the group commit's own code, event included
(claimed by its key, so a copy the sender re-sent meanwhile, through any replica, is found stored and the
letter resolved as such). Each letter is written in a savepoint of its own, so one the server still
refuses costs only itself; at most ``MAX_SAVEPOINTS`` letters go in one transaction (more
subtransactions than that slow every snapshot on the server), and each transaction marks what it stored
resolved as it commits. A storage fault part-way leaves the committed transactions' letters resolved and
the others as they were: retrying again is safe.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from storage.dead_letters import LIST_UNRESOLVED, DeadLetter, RetryOutcome, RetrySummary, retry_letter
from storage.deliveries import Record, WriteResult
from storage.errors import StorageUnavailable
from storage.postgres.connection import Connection
from storage.postgres.outbox import ChangeSet
from storage.postgres.retries import ATTEMPTS, RETRIED
from storage.postgres.writes import MAX_SAVEPOINTS, REFUSALS, unstorable, write_deliveries
from storage.replay import Parse, StoredEvent

_UNRESOLVED_BODIES = """
SELECT id, delivery_key, source, event_type, conversation_id, received_at, body
FROM dead_letters WHERE resolved_at IS NULL
"""
UNRESOLVED = _UNRESOLVED_BODIES + " ORDER BY id"
UNRESOLVED_OF = _UNRESOLVED_BODIES + " AND id = ANY(%s::int8[]) ORDER BY id"
# A letter another run resolved meanwhile stays as that run left it.
RESOLVE = "UPDATE dead_letters SET resolved_at = %s WHERE id = %s AND resolved_at IS NULL"
STILL_FAILING = (
    "UPDATE dead_letters SET attempts = attempts + 1, error = %s, failed_at = %s WHERE id = %s AND resolved_at IS NULL"
)


def list_unresolved(conn: Connection) -> list[DeadLetter]:
    """Every unresolved dead letter, oldest first; bodies are not read."""
    return [DeadLetter(*row) for row in conn.execute(LIST_UNRESOLVED).fetchall()]


def retry(conn: Connection, parsers: Mapping[str, Parse], ids: Iterable[int] | None = None) -> RetrySummary:
    """Parse and store the unresolved dead letters (only ``ids``, if given), oldest first, a savepoint each,
    at most ``MAX_SAVEPOINTS`` per transaction. ``conn`` is in autocommit mode with no transaction open.

    ``psycopg.OperationalError`` (a lost connection) propagates: the transactions committed before stay,
    and retrying again is safe."""
    summary = RetrySummary()
    wanted = sorted(set(ids)) if ids is not None else None
    if wanted is None:
        letters = [StoredEvent(*row) for row in conn.execute(UNRESOLVED).fetchall()]
    else:
        letters = [StoredEvent(*row) for row in conn.execute(UNRESOLVED_OF, (wanted,)).fetchall()]
        found = {event.id for event in letters}
        summary.unknown_ids = [i for i in wanted if i not in found]
    for start in range(0, len(letters), MAX_SAVEPOINTS):
        summary.outcomes += _retry_chunk(conn, parsers, letters[start : start + MAX_SAVEPOINTS])
    return summary


def _retry_chunk(conn: Connection, parsers: Mapping[str, Parse], letters: list[StoredEvent]) -> list[RetryOutcome]:
    """One transaction; written again whole if chosen as a deadlock victim (a writer of the same
    conversation), as the group commit does."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with conn.transaction():
                now = time.time()
                outcomes = []
                changes = ChangeSet()
                for event in letters:
                    outcome = _retry_one(conn, parsers, event, changes)
                    outcomes.append(outcome)
                    if outcome.status == "failed":
                        conn.execute(STILL_FAILING, (outcome.error, now, event.id))
                    else:
                        conn.execute(RESOLVE, (now, event.id))
                changes.record(conn)  # the stored letters reach the feed and the receivers, as on SQLite
            return outcomes
        except RETRIED as exc:
            if attempt == ATTEMPTS:
                raise StorageUnavailable(f"storage is unavailable: {exc.__class__.__name__} {ATTEMPTS} times") from exc
    raise AssertionError("unreachable")


def _retry_one(conn: Connection, parsers: Mapping[str, Parse], event: StoredEvent, changes: ChangeSet) -> RetryOutcome:
    def store(delivery: Record) -> WriteResult | str:
        if (reason := unstorable(delivery)) is not None:
            return reason
        tracked = changes.tracked()
        try:
            with conn.transaction():  # a savepoint: a refusal rolls back this delivery alone
                (result,) = write_deliveries(conn, [delivery], changes)
        except REFUSALS as exc:
            changes.forget_since(tracked)
            return f"{exc.__class__.__name__}: {exc}"
        return result

    return retry_letter(parsers, event, store)
