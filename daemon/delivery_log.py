"""The delivery log: one line per delivery at info, on ``transcriptd.deliveries``, whatever became of it.

It answers "did the vendor call us for X?" from the logs: the conversation, the source, the event type, the
outcome, the counts, the size and how long the answer took. Outcomes: ``stored``, ``duplicate`` (this delivery
was stored before), ``partial`` (422: the valid part stored), ``enqueued`` (202), ``rejected`` (a 4xx: nothing
stored, the reason and the field named), ``unavailable`` (503: overloaded, shutting down, storage unavailable),
``timeout`` (503: not committed within ``ingest.ack_timeout_s``), ``failed`` (500: the database refused it).

One record per delivery, with lazy %-arguments, and none at all when ``logging.deliveries`` is off. The
URL path is never logged (it may hold the webhook token); the JSON format carries every field as a key too.

The record is a copy of one made at import, given its arguments and time, and handed to ``log.handle``:
the same record ``log.info`` would make (handlers, filters and pytest's caplog see no difference), without
what ``Logger._log`` and ``LogRecord.__init__`` spend finding out, per call, what is the same for every
delivery: about a sixth of the line's instructions (97k -> 81k in the text format, under callgrind). A
record factory set with ``logging.setLogRecordFactory`` is not used for these lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import msgspec

from daemon.errors import InvalidPayload, TranscriptdError, from_storage
from daemon.inflight import InFlight
from storage.deliveries import WriteResult
from storage.errors import StorageError

log = logging.getLogger("transcriptd.deliveries")

FIELDS: Final = (
    "outcome",
    "conversation",
    "source",
    "event_type",
    "status",
    "received",
    "inserted",
    "updated",
    "duplicates",
    "rejected",
    "bytes",
    "latency_ms",
    "reason",
    "field",
)
FORMAT: Final = (
    "delivery %s: conversation=%r source=%s event=%r status=%d received=%d inserted=%d updated=%d duplicates=%d "
    "rejected=%d bytes=%d latency_ms=%.1f reason=%s field=%s"
)
# Read by daemon.logs: the names of the arguments, so the JSON format can give each its key.
EXTRA: Final = {"fields": FIELDS}
# What every delivery's record holds before its arguments and time: what ``log.info(FORMAT, ..., extra=EXTRA)``
# gives once daemon.logs.configure has turned off the caller, thread and process lookups.
_TEMPLATE: Final = logging.LogRecord(
    log.name, logging.INFO, "(unknown file)", 0, FORMAT, None, None, "(unknown function)"
).__dict__ | {"thread": None, "threadName": None, "processName": None, "process": None, **EXTRA}


def stored(delivery: InFlight, result: WriteResult, outcome: str, started: float) -> None:
    """A committed delivery (200): ``stored`` or ``duplicate``."""
    if not log.isEnabledFor(logging.INFO):  # server.log_level above info: not even the arguments
        return
    record = delivery.record
    _emit(
        (
            outcome,
            record.conversation_id,
            record.source,
            record.event_type,
            200,
            result.received,
            result.inserted,
            result.updated,
            result.duplicates,
            result.rejected,
            len(record.body),
            _ms(started),
            None,
            None,
        )
    )


def enqueued(delivery: InFlight, started: float) -> None:
    """In the mailbox (202): what it will insert is known only at the commit."""
    if not log.isEnabledFor(logging.INFO):  # server.log_level above info: not even the arguments
        return
    record = delivery.record
    _emit(
        (
            "enqueued",
            record.conversation_id,
            record.source,
            record.event_type,
            202,
            record.received,
            0,
            0,
            0,
            record.rejected,
            len(record.body),
            _ms(started),
            None,
            None,
        )
    )


class _Peek(msgspec.Struct):
    # Any: a field of the wrong type must not hide the other.
    conversation_id: Any = None
    event_type: Any = None


def not_stored(
    error: BaseException,
    *,
    source: str,
    conversation: str | None,
    body: bytes,
    delivery: InFlight | None,
    started: float,
) -> None:
    """A delivery answered with an error: what was known of it when it failed. Off the hot path."""
    if not log.isEnabledFor(logging.INFO):  # server.log_level above info: not even the arguments
        return
    status, reason, field = _described(error)
    event_type = None
    if delivery is not None:
        conversation, event_type = delivery.record.conversation_id, delivery.record.event_type
    elif body and conversation is None:
        # Refused before a delivery was built: name the conversation if the body says which, best effort.
        try:
            peek = msgspec.json.decode(body, type=_Peek)
            conversation = peek.conversation_id if isinstance(peek.conversation_id, str) else None
            event_type = peek.event_type if isinstance(peek.event_type, str) else None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass
    result = delivery.result if delivery is not None else None
    if isinstance(error, InvalidPayload) and error.accepted is not None:
        outcome = "partial"
    elif status < 500:
        outcome = "rejected"
    elif reason == "commit_timeout":
        outcome = "timeout"
    else:
        outcome = "unavailable" if status == 503 else "failed"
    _emit(
        (
            outcome,
            _printable(conversation),
            source,
            _printable(event_type),
            status,
            delivery.record.received if delivery is not None else 0,
            result.inserted if result is not None else 0,
            result.updated if result is not None else 0,
            result.duplicates if result is not None else 0,
            delivery.record.rejected if delivery is not None else 0,
            len(body),
            _ms(started),
            reason,
            field,
        )
    )


def _emit(args: tuple[object, ...]) -> None:
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__ = _TEMPLATE.copy()  # a copy of the whole dict: half the cost of setting its keys one by one
    record.args = args
    # As LogRecord.__init__ sets them.
    now = time.time()
    record.created = now
    record.msecs = int((now - int(now)) * 1000) + 0.0
    record.relativeCreated = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
    log.handle(record)


def _described(error: BaseException) -> tuple[int, str, str | None]:
    if isinstance(error, StorageError):
        error = from_storage(error)
    if isinstance(error, TranscriptdError):
        return error.status, error.code, error.field
    return 500, "internal_error", None


def _printable(text: str | None) -> str | None:
    # An id the database refused may hold a lone surrogate, which no UTF-8 log line can carry as it is.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
