"""What the parsers hand to storage: one delivery's record (its rows, its conversation changes), the
message row shapes and their columns, and the outcome of its write.

A ``Record`` is built whole by a parser (daemon.sources.*, replay, dead-letter retry) and never changed
after: whoever needs it different (intake adding the URL's metadata, replay its appended rows'
positions) makes a copy with ``msgspec.structs.replace``. What happens to it in flight (who waits, its
result) is the daemon's (daemon.inflight.InFlight); the writer sees that only through ``Pending``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import msgspec

from storage.errors import StorageError

# NULL in the rows the writer binds in bulk. Python's sqlite3 binds None through its adapter protocol,
# ~240 ns a parameter here, against ~20 for a float, and SQLite stores a NaN double as NULL: a transcript
# row carries about four NULLs, so NaN takes ~1.3 ms of GIL time off a 3,200-row commit (None still works).
NULL: float = math.nan
MaybeReal = float | None
MaybeText = str | float | None  # text, or NULL as NaN

# The message row shapes, each named once, column by column: the INSERT column lists of both backends
# (storage.statements, storage.postgres.statements), the rows' widths and the positions the writers read
# are derived from these, and tests/test_message_columns.py checks every row builder against them. Rows
# stay plain tuples in this order, so sqlite3 binds them as they are (a NamedTuple costs more to build).
MESSAGE_COLUMNS = (
    "conversation_id",
    "source",
    "seq",
    "role",
    "content",
    "timestamp",
    "seconds_from_start",
    "duration",
    "inference_id",
    "external_id",
    "created_at",
)
MessageRow = tuple[str, str, int, str, str, MaybeReal, MaybeReal, MaybeReal, MaybeText, MaybeText, float]
# A source whose roles are mapped to the normalised ones (Vapi's "bot" is "assistant") also keeps the
# vendor's own, NULL where they are equal. Two shapes, so that a source whose roles need no mapping
# (Tavus) binds no extra column: measured on the writer alone, a twelfth column on every Tavus row cost
# ~4% of its CPU time. All rows of one delivery have one shape.
_EXTERNAL_ID = MESSAGE_COLUMNS.index("external_id")
VENDOR_MESSAGE_COLUMNS = (*MESSAGE_COLUMNS[:_EXTERNAL_ID], "vendor_role", *MESSAGE_COLUMNS[_EXTERNAL_ID:])
VendorMessageRow = tuple[
    str, str, int, str, str, MaybeReal, MaybeReal, MaybeReal, MaybeText, MaybeText, MaybeText, float
]
VENDOR_ROW_WIDTH = len(VENDOR_MESSAGE_COLUMNS)
VENDOR_ROLE = VENDOR_MESSAGE_COLUMNS.index("vendor_role")
# What a re-delivery may change in a stored message: the vendor row's columns up to its external id (the
# key, conversation_id, source and seq, first).
CHANGED_MESSAGE_COLUMNS = VENDOR_MESSAGE_COLUMNS[: VENDOR_MESSAGE_COLUMNS.index("external_id")]
# The generic endpoint's rows: appended, and the writer assigns the position.
APPEND_COLUMNS = ("conversation_id", "source", "role", "content", "timestamp", "external_id", "created_at")
AppendRow = tuple[str, str, str, str, float | None, str | None, float]
# What identifies an appended message the client sent before, and what a new copy of it may change: its
# columns up to the external id.
CHANGED_APPEND_COLUMNS = APPEND_COLUMNS[: APPEND_COLUMNS.index("external_id") + 1]

# Positions the writers and parsers read (the same in both message shapes before the vendor role). Literal,
# because mypy types a tuple's item by a literal index only; checked against the declarations just below.
SEQ: Final = 2
TIMESTAMP: Final = 5
APPEND_TIMESTAMP: Final = 4
APPEND_EXTERNAL_ID = APPEND_COLUMNS.index("external_id")
_NAMED = (
    MESSAGE_COLUMNS[SEQ],
    MESSAGE_COLUMNS[TIMESTAMP],
    VENDOR_MESSAGE_COLUMNS[TIMESTAMP],
    APPEND_COLUMNS[APPEND_TIMESTAMP],
)
if _NAMED != ("seq", "timestamp", "timestamp", "timestamp"):
    raise ImportError("storage.deliveries: SEQ, TIMESTAMP or APPEND_TIMESTAMP names the wrong column")


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

Status = Literal["active", "ended", "failed"]


# What a delivery held in memory costs, measured (python -m bench.delivery_memory: tracemalloc, and RSS in
# a run without it; every delivery in a conversation of its own, so an actor each; CPython 3.11, x86-64):
#   body  126 B,   1 row  (generic, one message):     2,833 B held,   2,992 B RSS
#   body  231 B,   0 rows (a Tavus system event):      2,506 B held,   2,651 B RSS
#   body 1.3 KB,  10 rows (generic, a list of ten):    5,941 B held,   6,425 B RSS
#   body 8.5 KB,  11 rows (a 10-turn transcript):     18,779 B held,  19,945 B RSS
#   body 41 KB,  101 rows (a 100-turn transcript):   120,152 B held, 130,019 B RSS
# The fixed part is the Record and its in-flight wrapper, with its Event, patch, key and lists, its actor
# and the registry's entries (~2.1 KB whatever the body); a transcript row is a tuple of eleven with its
# floats and ids (~360 B); the body is held twice, as received and as decoded text. Counted below, each
# figure above is within 0.9-1.1x of its RSS (a list of small messages is over-counted, up to 1.5x): the
# budget is memory.
DELIVERY_FIXED_BYTES = 2_304
DELIVERY_ROW_BYTES = 384


def weight_of(body_bytes: int, rows: int = 0) -> int:
    """The memory a delivery of a body this size, with this many message rows, holds (in-flight budget)."""
    return DELIVERY_FIXED_BYTES + 2 * body_bytes + DELIVERY_ROW_BYTES * rows


class ConversationPatch(msgspec.Struct, frozen=True, kw_only=True):
    """Columns one event sets on its conversation; None leaves a column as it is. Built whole by its parser.

    (A frozen msgspec Struct, not a frozen dataclass: that one's ``__init__`` sets each field through
    ``object.__setattr__``, ~2 us a patch against ~0.15 here, on every delivery.)"""

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


NO_CHANGE = ConversationPatch()


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


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What storage writes of one accepted delivery: its event, its conversation's changes and its messages.

    Built whole by the source's parser; ``metadata`` and ``problems`` are intake's, set on a copy when the
    request has any. Frozen: the writer thread reads it while the event loop goes on."""

    key: str
    source: str
    event_type: str
    conversation_id: str
    received_at: float
    body: bytes
    patch: ConversationPatch = NO_CHANGE
    rows: Rows = ()
    append_rows: Sequence[AppendRow] = ()
    last_message_at: float | None = None
    # The callback URL's query parameters, a JSON object of strings (daemon.metadata); None: leave as is.
    metadata: str | None = None
    rejected: int = 0
    # Problems its answer names (a 422 whose valid part is stored): kept with the event, for its timeline.
    problems: int = 0

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


class Pending(Protocol):
    """What the writer queues: a record, and whom to tell once it is committed (daemon.inflight.InFlight)."""

    @property
    def record(self) -> Record: ...

    # Someone waits for the commit (durable ack): on a storage fault, fail fast so they can retry.
    # Nobody waits (enqueued ack): the delivery was acknowledged, so the writer keeps retrying it.
    @property
    def awaited(self) -> bool: ...

    def resolve(self, result: WriteResult) -> None:
        """Committed: called on the event loop."""
        ...

    def fail(self, error: StorageError) -> None:
        """Not stored: called on the event loop."""
        ...


def message_counts(inserted: Iterable[tuple[Record, int]]) -> dict[str, tuple[int, float | None]]:
    """Per conversation, from (record, messages it inserted): the messages inserted, and the latest message
    time of the deliveries that inserted any. Both backends add these to the conversations' counts."""
    counts: dict[str, tuple[int, float | None]] = {}
    for delivery, n in inserted:
        if n:
            count, last = counts.get(delivery.conversation_id, (0, None))
            stamp = delivery.last_message_at
            last = stamp if last is None or (stamp is not None and stamp > last) else last
            counts[delivery.conversation_id] = (count + n, last)
    return counts
