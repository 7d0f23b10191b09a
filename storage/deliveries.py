"""What intake hands to the writer: one delivery's rows, its conversation changes, and its outcome."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio

from storage.errors import StorageError

log = logging.getLogger("transcriptd.deliveries")

# NULL in the rows the writer binds in bulk. Python's sqlite3 binds None through its adapter protocol,
# ~240 ns a parameter here, against ~20 for a float, and SQLite stores a NaN double as NULL: a transcript
# row carries about four NULLs, so NaN takes ~1.3 ms of GIL time off a 3,200-row commit (None still works).
NULL: float = math.nan
MaybeReal = float | None
MaybeText = str | float | None  # text, or NULL as NaN

# (conversation_id, source, seq, role, content, timestamp, seconds_from_start, duration, inference_id,
#  external_id, created_at): the column order of statements.INSERT_MESSAGES, so rows are bound as they are.
MessageRow = tuple[str, str, int, str, str, MaybeReal, MaybeReal, MaybeReal, MaybeText, MaybeText, float]
# (conversation_id, source, seq, role, content, timestamp, seconds_from_start, duration, inference_id,
#  vendor_role, external_id, created_at): statements.INSERT_VENDOR_MESSAGES, for a source whose roles are
# mapped to the normalised ones (Vapi's "bot" is "assistant"); vendor_role is NULL where they are equal.
# Two shapes, so that a source whose roles need no mapping (Tavus) binds no extra column: measured on
# the writer alone, a twelfth column on every Tavus row cost ~4% of its CPU time. All rows of one
# delivery have one shape.
VendorMessageRow = tuple[
    str, str, int, str, str, MaybeReal, MaybeReal, MaybeReal, MaybeText, MaybeText, MaybeText, float
]
VENDOR_ROW_WIDTH = 12


def vendor_row(
    conversation_id: str,
    source: str,
    seq: int,
    role: str,
    content: str,
    vendor_role: str,
    created_at: float,
    *,
    timestamp: float | None = None,
    seconds_from_start: float | None = None,
    duration: float | None = None,
) -> VendorMessageRow:
    """One message of a source whose roles are mapped: None as NULL (NaN, see ``NULL``), and the vendor's own
    role only where it differs from the normalised one."""
    return (
        conversation_id,
        source,
        seq,
        role,
        content,
        NULL if timestamp is None else timestamp,
        NULL if seconds_from_start is None else seconds_from_start,
        NULL if duration is None else duration,
        NULL,
        NULL if vendor_role == role else vendor_role,
        NULL,
        created_at,
    )


Row = MessageRow | VendorMessageRow
Rows = Sequence[Row]
# (conversation_id, source, role, content, timestamp, external_id, created_at): the generic endpoint
# appends, and the writer assigns the position.
AppendRow = tuple[str, str, str, str, float | None, str | None, float]

Status = Literal["active", "ended", "failed"]


# What a delivery held in memory costs, measured (python -m bench.delivery_memory: tracemalloc, and RSS in
# a run without it; every delivery in a conversation of its own, so an actor each; CPython 3.11, x86-64):
#   body  126 B,   1 row  (generic, one message):     2,833 B held,   2,992 B RSS
#   body  231 B,   0 rows (a Tavus system event):      2,506 B held,   2,651 B RSS
#   body 1.3 KB,  10 rows (generic, a list of ten):    5,941 B held,   6,425 B RSS
#   body 8.5 KB,  11 rows (a 10-turn transcript):     18,779 B held,  19,945 B RSS
#   body 41 KB,  101 rows (a 100-turn transcript):   120,152 B held, 130,019 B RSS
# The fixed part is the Delivery, its Event, patch, key and lists, its actor and the registry's entries
# (~2.1 KB whatever the body); a transcript row is a tuple of eleven with its floats and ids (~360 B);
# the body is held twice, as received and as decoded text. Counted below, each figure above is within
# 0.9-1.1x of its RSS (a list of small messages is over-counted, up to 1.5x): the budget is memory.
DELIVERY_FIXED_BYTES = 2_304
DELIVERY_ROW_BYTES = 384


def weight_of(body_bytes: int, rows: int = 0) -> int:
    """The memory a delivery of a body this size, with this many message rows, holds (in-flight budget)."""
    return DELIVERY_FIXED_BYTES + 2 * body_bytes + DELIVERY_ROW_BYTES * rows


@dataclass(slots=True, kw_only=True)
class ConversationPatch:
    """Columns one event sets on its conversation; None leaves a column as it is."""

    status: Status | None = None
    replica_id: str | None = None
    shutdown_reason: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    recording_uri: str | None = None
    recording_provider: str | None = None
    recording_duration: float | None = None
    recording_error: str | None = None
    perception_analysis: str | None = None
    perception_unavailable_reason: str | None = None
    end_reason: str | None = None  # the vendor's reason the call ended, or failed
    analysis: str | None = None  # the vendor's analysis (summary, success, structured data) as JSON text


@dataclass(slots=True, frozen=True)
class WriteResult:
    received: int
    inserted: int
    updated: int
    rejected: int = 0
    duplicate_delivery: bool = False
    # The conversation was erased (it has a tombstone): nothing of the delivery was stored.
    erased: bool = False

    @property
    def duplicates(self) -> int:
        return self.received - self.rejected - self.inserted - self.updated


@dataclass(slots=True, eq=False, kw_only=True)
class Delivery:
    """One accepted request, from intake to commit. The writer fills ``result`` or ``error``, then ``done``."""

    key: str
    source: str
    event_type: str
    conversation_id: str
    received_at: float
    body: bytes
    patch: ConversationPatch = field(default_factory=ConversationPatch)
    rows: Rows = field(default_factory=list)
    append_rows: list[AppendRow] = field(default_factory=list)
    last_message_at: float | None = None
    # The callback URL's query parameters, a JSON object of strings (daemon.metadata); None: leave as is.
    metadata: str | None = None
    rejected: int = 0
    # Problems its answer names (a 422 whose valid part is stored): kept with the event, for its timeline.
    problems: int = 0
    # When intake handed it over (time.monotonic()): how long its sender has been waiting.
    taken_at: float = 0.0
    # Someone waits for the commit (durable ack): on a storage fault, fail fast so they can retry.
    # Nobody waits (enqueued ack): the delivery was acknowledged, so the writer keeps retrying it.
    awaited: bool = True
    result: WriteResult | None = None
    error: StorageError | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    # Called once, on the event loop, when the delivery is resolved or failed: its actor moves on.
    on_settled: Callable[[Delivery], None] | None = None

    @property
    def received(self) -> int:
        return len(self.rows) + len(self.append_rows) + self.rejected

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.append_rows) + 1

    @property
    def weight(self) -> int:
        """About the memory it holds (see ``weight_of``)."""
        return weight_of(len(self.body), len(self.rows) + len(self.append_rows))

    def resolve(self, result: WriteResult) -> None:
        self.result = result
        self._settle()

    def fail(self, error: StorageError) -> None:
        self.error = error
        self._settle()

    def _settle(self) -> None:
        self.done.set()
        settled, self.on_settled = self.on_settled, None
        if settled is not None:
            try:
                settled(self)
            except Exception:
                # Called from the writer's resolution loop: one broken callback must not leave the other
                # deliveries of the commit unanswered.
                log.exception("settling delivery %s failed", self.key)


def message_counts(inserted: Iterable[tuple[Delivery, int]]) -> dict[str, tuple[int, float | None]]:
    """Per conversation, from (delivery, messages it inserted): the messages inserted, and the latest message
    time of the deliveries that inserted any. Both backends add these to the conversations' counts."""
    counts: dict[str, tuple[int, float | None]] = {}
    for delivery, n in inserted:
        if n:
            count, last = counts.get(delivery.conversation_id, (0, None))
            stamp = delivery.last_message_at
            last = stamp if last is None or (stamp is not None and stamp > last) else last
            counts[delivery.conversation_id] = (count + n, last)
    return counts
