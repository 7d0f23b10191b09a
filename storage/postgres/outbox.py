"""The transactional outbox on PostgreSQL: one change per conversation per commit, in the same transaction.

The same rows as storage.outbox records on SQLite (kinds, counts, status, seq range), with one more
guarantee several replicas need. Positions come from an identity column, and a sequence hands its values
out when they are asked for, not when their transactions commit: replica A could take position 5, replica
B position 6, and B commit first. A reader polling ``position > after`` would then see 6, move on, and
skip 5 forever once A commits.

So every insert into ``changes`` takes ``ORDER_LOCK`` (``pg_advisory_xact_lock``) first, as the last
thing its transaction does before COMMIT, and holds it until the commit is visible (the server releases
a transaction's locks after it has marked it committed). Positions are thus handed out and made visible
in one order: whoever sees position N has every position below it that will ever commit. The cost: the
tail of each transaction that records changes (its changes insert and its COMMIT, including the WAL
flush) is serialized across replicas; the deliveries' own writes before it, and transactions that record
nothing (duplicates, ``changes.enabled = false``), are not. So the database takes about one such commit
per WAL flush (a thousand a second if a flush takes a millisecond), each a whole group commit.

``latest_position`` takes the same lock shared, so it never reports a position whose transaction has
yet to commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from storage.outbox import ERASED_KINDS, KIND_COLUMNS, Snapshot, TrackedChanges
from storage.postgres.connection import Connection

# pg_advisory_xact_lock's key (any bigint no other application on the database uses): "trnsoutb".
ORDER_LOCK = 0x74726E736F757462

_COLUMNS = ("source", *(column for columns in KIND_COLUMNS.values() for column in columns))
SNAPSHOT = f"SELECT id, {', '.join(_COLUMNS)} FROM conversations WHERE id = ANY(%b::text[])"  # noqa: S608

INSERT_CHANGES = """
INSERT INTO changes (conversation_id, source, status, kinds, first_seq, last_seq, committed_at)
SELECT conversation_id, source, status, kinds, first_seq, last_seq, committed_at
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::int8[], %b::int8[], %b::float8[])
    WITH ORDINALITY AS v (conversation_id, source, status, kinds, first_seq, last_seq, committed_at, n)
ORDER BY n
RETURNING position
"""


def take_order_lock(conn: Connection) -> None:
    """Inside the open transaction, right before inserting into ``changes``: positions given from now on
    are visible in position order (see the module's docstring). Held until COMMIT or ROLLBACK."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ORDER_LOCK,))


class ChangeSet(TrackedChanges):
    """The conversations one transaction touches, as they were before it, and the messages it changed.

    The writes lock the conversations first (storage.postgres.statements.LOCK_CONVERSATIONS), then
    ``track`` them: under the row lock the snapshot is the state the transaction starts from, whatever
    another replica committed before. Start a new one for each transaction (a retried batch, each chunk
    of the savepoint path). ``enabled=False`` records nothing (``changes.enabled``).
    """

    def track(self, conn: Connection, conversation_ids: Iterable[str], created: Iterable[str] = ()) -> None:
        """Read how the conversations not tracked yet are now; those in ``created`` were inserted by this
        transaction (they had no state before it)."""
        if not self.enabled:
            return
        new = [cid for cid in dict.fromkeys(conversation_ids) if cid not in self._before]
        if not new:
            return
        inserted = set(created)
        found = _snapshots(conn, [cid for cid in new if cid not in inserted])
        for cid in new:
            self._before[cid] = found.get(cid)

    def tracked(self) -> frozenset[str]:
        return frozenset(self._before)

    def forget_since(self, tracked: frozenset[str]) -> None:
        """After a savepoint is rolled back: forget what it tracked (its row locks went with it, so the
        snapshot may be stale when the conversation is locked again)."""
        for cid in [cid for cid in self._before if cid not in tracked]:
            del self._before[cid]

    def record(self, conn: Connection, *, now: float | None = None) -> int | None:
        """Insert one change per tracked conversation that changed, last thing inside the open transaction
        (it takes ``ORDER_LOCK`` until COMMIT): the position of the last one, or None if nothing changed."""
        if not self.enabled or not self._before:
            return None
        changed = self._changed(_snapshots(conn, list(self._before)))
        committed_at = time.time() if now is None else now
        rows: list[tuple[str, str, str, str, int | None, int | None]] = [
            (cid, str(current[0]), str(current[1]), kinds, first, last) for cid, current, kinds, first, last in changed
        ]
        if not rows:
            return None
        take_order_lock(conn)
        columns: list[list[object]] = [list(column) for column in zip(*rows, strict=True)]
        columns.append([float(committed_at)] * len(rows))
        positions = [int(row[0]) for row in conn.execute(INSERT_CHANGES, columns).fetchall()]
        return max(positions)


def _snapshots(conn: Connection, conversation_ids: list[str]) -> dict[str, Snapshot]:
    if not conversation_ids:
        return {}
    return {row[0]: tuple(row[1:]) for row in conn.execute(SNAPSHOT, (conversation_ids,)).fetchall()}


ERASED_SOURCE = """
SELECT coalesce(
    (SELECT source FROM conversations WHERE id = %(cid)s),
    (SELECT source FROM events WHERE conversation_id = %(cid)s LIMIT 1),
    (SELECT source FROM dead_letters WHERE conversation_id = %(cid)s LIMIT 1),
    (SELECT source FROM changes WHERE conversation_id = %(cid)s ORDER BY position DESC LIMIT 1)
)
"""
DELETE_CHANGES = "DELETE FROM changes WHERE conversation_id = %s"


def erased_source(conn: Connection, conversation_id: str) -> str | None:
    """The source of a conversation about to be erased (read before its rows go)."""
    row = conn.execute(ERASED_SOURCE, {"cid": conversation_id}).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def record_erased(conn: Connection, conversation_id: str, source: str, now: float) -> int:
    """The one change an erasure leaves (its earlier ones are deleted with the rest): status NULL. Last
    thing before COMMIT: it takes ``ORDER_LOCK``."""
    take_order_lock(conn)
    row = conn.execute(
        "INSERT INTO changes (conversation_id, source, status, kinds, committed_at) VALUES (%s, %s, NULL, %s, %s)"
        " RETURNING position",
        (conversation_id, source, ERASED_KINDS, now),
    ).fetchone()
    assert row is not None
    return int(row[0])


LAST_GIVEN = "SELECT pg_sequence_last_value(pg_get_serial_sequence('changes', 'position'))"


def latest_position(conn: Connection) -> int:
    """The highest position ever given (0: none yet); a pruned one still counts (the sequence never goes
    back). Read under ``ORDER_LOCK`` shared: a position whose transaction is still open is not reported
    (waits the short tail of that transaction). ``conn`` has no transaction open."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (ORDER_LOCK,))
        row = conn.execute(LAST_GIVEN).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])
