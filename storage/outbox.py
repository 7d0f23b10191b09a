"""The transactional outbox: what a transaction changed, recorded as one change per conversation, in it.

Every transaction that writes deliveries (the group commit, replay, a dead-letter retry, reconcile) holds
a ``ChangeSet``. The writes note each conversation before they touch it (``track``) and the messages they
add or update (``messages``); last thing before COMMIT, ``record`` reads the tracked conversations again
and inserts one row into ``changes`` for each one that changed, whatever the number of deliveries the
transaction held for it. A delivery that changes nothing (a re-delivery, a repeat of stored rows)
records nothing. The feed (``GET /changes``) and the outbound notifications read these rows by position.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from storage import statements as sql

# What a change says changed, by the conversation's columns compared before and after the transaction
# (message counts are noted by the writes themselves: comparing messages would cost a read of each).
KIND_COLUMNS: dict[str, tuple[str, ...]] = {
    "status": ("status",),
    "recording": ("recording_uri", "recording_provider", "recording_duration", "recording_error"),
    "analysis": ("analysis", "perception_analysis", "perception_unavailable_reason"),
    "details": ("replica_id", "shutdown_reason", "started_at", "ended_at", "end_reason", "metadata"),
}
_COLUMNS = ("source", *(column for columns in KIND_COLUMNS.values() for column in columns))
_SLICES: dict[str, slice] = {}
_start = 1  # after source
for _kind, _columns in KIND_COLUMNS.items():
    _SLICES[_kind] = slice(_start, _start + len(_columns))
    _start += len(_columns)

# One row, the whole snapshot as JSON, rather than a row per conversation: the writer shares the GIL with
# the event loop, and sqlite3 lets go of it around each step of a statement, so each row fetched can wait
# for a turn of the busy loop (see storage.statements). Measured on the writer alone, a two-delivery
# commit spends ~0.05 ms in each snapshot and ~0.04 ms inserting its changes; its COMMIT writes ~0.3 ms
# more (the changes table, its index and sqlite_sequence: three more pages in the WAL).
SNAPSHOT = f"SELECT json_group_array(json_array(id, {', '.join(_COLUMNS)})) FROM conversations WHERE id IN ("  # noqa: S608
SNAPSHOT_TAIL = ")"

INSERT_CHANGES = "INSERT INTO changes (conversation_id, source, status, kinds, first_seq, last_seq, committed_at)"

Snapshot = tuple[object, ...]


@dataclass(slots=True)
class Messages:
    """The messages one transaction added and updated in a conversation, and their positions' range."""

    added: int = 0
    updated: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    def add(self, added: int, updated: int, seqs: Sequence[int]) -> None:
        self.added += added
        self.updated += updated
        if seqs:
            low, high = min(seqs), max(seqs)
            self.first_seq = low if self.first_seq is None else min(low, self.first_seq)
            self.last_seq = high if self.last_seq is None else max(high, self.last_seq)


class TrackedChanges:
    """What both backends' ChangeSets hold: the tracked conversations as they were before the transaction,
    the messages it changed, and from those the changes to record."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._before: dict[str, Snapshot | None] = {}
        self._messages: dict[str, Messages] = {}

    def messages(self, conversation_id: str, added: int, updated: int, seqs: Sequence[int]) -> None:
        """Note messages added or updated at positions ``seqs`` (all of them, or a range's two ends)."""
        if not self.enabled or not (added or updated):
            return
        noted = self._messages.get(conversation_id)
        if noted is None:
            noted = self._messages[conversation_id] = Messages()
        noted.add(added, updated, seqs)

    def _changed(self, after: Mapping[str, Snapshot]) -> list[tuple[str, Snapshot, str, int | None, int | None]]:
        """(conversation id, snapshot now, kinds as JSON, first seq, last seq) of each tracked conversation
        that changed, given the snapshots read now (one missing: its only delivery was refused, or was a
        duplicate, and its row rolled back or dropped)."""
        changed = []
        for cid, before in self._before.items():
            current = after.get(cid)
            if current is None:
                continue
            noted = self._messages.get(cid)
            kinds = kinds_changed(before, current, noted)
            if not kinds:
                continue
            first, last = (noted.first_seq, noted.last_seq) if noted is not None else (None, None)
            changed.append((cid, current, msgspec.json.encode(kinds).decode(), first, last))
        return changed


class ChangeSet(TrackedChanges):
    """The conversations one transaction touches, as they were before it, and the messages it changed.

    Start a new one after a ROLLBACK of the whole transaction. A savepoint rolled back leaves the
    snapshots right (they are of the state before the transaction) and notes no messages (the writes
    note them only once they succeeded). ``enabled=False`` records nothing (``changes.enabled``).
    """

    def track(self, conn: sqlite3.Connection, conversation_ids: Iterable[str]) -> None:
        """Read how the conversations not tracked yet are now, before this transaction changes them."""
        if not self.enabled:
            return
        new = [cid for cid in dict.fromkeys(conversation_ids) if cid not in self._before]
        if not new:
            return
        found = _snapshots(conn, new)
        for cid in new:
            self._before[cid] = found.get(cid)

    def record(self, conn: sqlite3.Connection, *, now: float | None = None) -> int | None:
        """Insert one change per tracked conversation that changed, inside the open transaction: the
        position of the last one, or None if nothing changed."""
        if not self.enabled or not self._before:
            return None
        changed = self._changed(_snapshots(conn, list(self._before)))
        committed_at = time.time() if now is None else now
        rows: list[tuple[object, ...]] = [
            (cid, current[0], current[1], kinds, first, last, committed_at)
            for cid, current, kinds, first, last in changed
        ]
        if not rows:
            return None
        return sql.insert_rows_last_id(conn, INSERT_CHANGES, rows)


def _snapshots(conn: sqlite3.Connection, conversation_ids: list[str]) -> dict[str, Snapshot]:
    found: dict[str, Snapshot] = {}
    for (text,) in sql.select_rows(conn, SNAPSHOT, [(cid,) for cid in conversation_ids], SNAPSHOT_TAIL):
        for item in _snapshot_rows.decode(text):
            found[item[0]] = tuple(item[1:])
    return found


_snapshot_rows = msgspec.json.Decoder(list[list[Any]])


def kinds_changed(before: Snapshot | None, after: Snapshot, messages: Messages | None) -> dict[str, int]:
    """What changed, by kind, from the snapshots (source first, then ``KIND_COLUMNS``'s columns in order;
    ``before`` None: the conversation is new) and the messages noted; empty: nothing."""
    kinds: dict[str, int] = {}
    if messages is not None:
        if messages.added:
            kinds["messages_added"] = messages.added
        if messages.updated:
            kinds["messages_updated"] = messages.updated
    if before is None:
        kinds["created"] = 1
    for kind, columns in _SLICES.items():
        if before is None:
            # New: its status, and a recording or analysis it came with (details are the creation itself).
            if kind == "status" or (kind != "details" and any(value is not None for value in after[columns])):
                kinds[kind] = 1
        elif before[columns] != after[columns]:
            kinds[kind] = 1
    return kinds


ERASED_SOURCE = """
SELECT coalesce(
    (SELECT source FROM conversations WHERE id = ?1),
    (SELECT source FROM events WHERE conversation_id = ?1 LIMIT 1),
    (SELECT source FROM dead_letters WHERE conversation_id = ?1 LIMIT 1),
    (SELECT source FROM changes WHERE conversation_id = ?1 ORDER BY position DESC LIMIT 1)
)
"""
DELETE_CHANGES = "DELETE FROM changes WHERE conversation_id = ?"
ERASED_KINDS = '{"erased":1}'


def erased_source(conn: sqlite3.Connection, conversation_id: str) -> str | None:
    """The source of a conversation about to be erased (read before its rows go)."""
    (source,) = conn.execute(ERASED_SOURCE, (conversation_id,)).fetchone()
    return None if source is None else str(source)


def record_erased(conn: sqlite3.Connection, conversation_id: str, source: str, now: float) -> int:
    """The one change an erasure leaves (its earlier ones are deleted with the rest): status NULL."""
    cursor = conn.execute(
        "INSERT INTO changes (conversation_id, source, status, kinds, committed_at) VALUES (?, ?, NULL, ?, ?)",
        (conversation_id, source, ERASED_KINDS, now),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def latest_position(conn: sqlite3.Connection) -> int:
    """The highest position ever given (0: none yet); a pruned one still counts (AUTOINCREMENT)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return 0 if row is None else int(row[0])
