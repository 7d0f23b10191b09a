"""The daemon's logging: one handler on the root logger, text or JSON lines, with every secret masked.

``configure(config)`` replaces ``logging.basicConfig``. uvicorn runs with ``log_config=None``, so its own
loggers (``uvicorn.error``) propagate to the root logger and go through the same handler, format and mask.

The mask is a last line of defence: nothing should log a token in the first place.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TextIO
from urllib.parse import quote

import msgspec

from daemon.config import Config, secret_paths, setting_paths
from daemon.sources import WEBHOOK_SOURCES

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
# The name of the handler ``configure`` installs: configuring again replaces it instead of adding a second.
HANDLER_NAME = "transcriptd"

# A setting whose name says it is a secret: found by name, so a future signing secret is masked too.
_SECRET_SETTING = re.compile(r"token|secret|password", re.IGNORECASE)
# The token segment of a webhook URL of any registered source, wherever it appears: a request line, a body
# echoing the callback URL (slashes possibly JSON-escaped, or percent-encoded). A wrong or old token is masked
# as well as the right one.
_SOURCE_NAMES = "|".join(re.escape(source.name) for source in WEBHOOK_SOURCES)
_WEBHOOK_TOKEN = re.compile(
    rf"((?:\\?/|%2F)webhooks(?:\\?/|%2F)(?:{_SOURCE_NAMES})(?:\\?/|%2F))(?!{re.escape(REDACTED)})[^/\s?#&\"'<>\\]+",
    re.IGNORECASE,
)
# The value of a webhook_url field, in JSON, a Python repr or a query string: Tavus echoes the callback URL,
# secret included, and a future vendor may put its secret elsewhere in that URL than the path. A quoted value
# is masked up to its closing quote (escaped or not), an unquoted one up to a separator.
_WEBHOOK_URL = re.compile(
    rf"""(webhook_url\\*["']?\s*[:=]\s*)(?!\\*["']?{re.escape(REDACTED)})"""
    r"""(\\*"(?:\\[^"]|[^"\\])*|\\*'(?:\\[^']|[^'\\])*|(?:\\/|[^"'\\\s,;&}\]])+)""",
    re.IGNORECASE,
)
_OPENING_QUOTE = re.compile(r"""\\*["']?""")
# Formats an exception the way logging.Formatter does, so the masked text is what every formatter prints.
_EXCEPTIONS = logging.Formatter()
_LOGGERS_OF_UVICORN = ("uvicorn", "uvicorn.error")


def configure(config: Config, *, stream: TextIO | None = None) -> None:
    """Log every record to ``stream`` (default: stderr) in ``logging.format``, at ``server.log_level``.

    Replaces the handler of an earlier call; handlers installed by others (pytest's) are left alone.
    """
    handler = LineHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    mask = RedactSecrets(config_secrets(config))
    handler.setFormatter(JsonFormatter(mask) if config.logging.format == "json" else TextFormatter())
    handler.addFilter(mask)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        old.flush()  # the lines still waiting for their loop's next turn
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.server.log_level.upper())
    # uvicorn's loggers have no handler of their own with log_config=None; make sure of it, so that their
    # records reach this handler (masked, in this format) and nowhere else.
    for name in _LOGGERS_OF_UVICORN:
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
    # httpx logs every request it makes at info, URL and all: one line per outbound notification would drown
    # the log, and a receiver's URL may carry a token in its query. Its warnings still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Python warnings would otherwise be printed to stderr as they are: not masked, and not JSON.
    logging.captureWarnings(True)
    # Neither format prints a record's caller, thread or process: not collecting them (the logging module's
    # documented optimisation) takes ~2.5 of the ~11 us a delivery's log line costs the event loop.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def config_secrets(config: Config) -> list[str]:
    """The value of every non-empty setting marked ``Secret`` or named like one (``webhooks.tavus.token``,
    ``api.token``, ``webhooks.<source>.api_key``...)."""
    secrets: list[str] = []
    marked = set(secret_paths())
    for path in setting_paths():
        if path not in marked and not _SECRET_SETTING.search(path[-1]):
            continue
        value: object = config
        for name in path:
            value = getattr(value, name)
        if isinstance(value, str) and value:
            secrets.append(value)
            # A setting may hold several secrets (signing keys during a rotation): each alone, and each
            # key without its whsec_ prefix, is a secret too.
            for part in value.split():
                secrets += [part, part.removeprefix("whsec_")]
    if config.storage.postgres:
        from storage.postgres.connection import password_of

        secrets += [password] if (password := password_of(config.storage.target)) else []
    return [s for s in dict.fromkeys(secrets) if len(s) >= 4]


class RedactSecrets(logging.Filter):
    """Masks the secrets, webhook URL tokens and ``webhook_url`` values in a record's message and exception.

    It rewrites the record in place (the message becomes the formatted, masked text and the arguments go),
    so any handler that sees the record after this one sees it masked too.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        variants = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""))}
        # Longest first: a secret that contains another is masked whole.
        self.secrets = sorted(variants, key=len, reverse=True)

    def redact(self, text: str) -> str:
        # The patterns first: a secret masked inside a URL would otherwise cut the URL short of its end. Both
        # need "webhook" (any case; lower() folds the Kelvin sign that IGNORECASE takes for k): most lines,
        # such as the delivery log's, have none, and skip both scans.
        if "webhook" in text.lower():
            text = _WEBHOOK_URL.sub(_mask_webhook_url, text)
            text = _WEBHOOK_TOKEN.sub(rf"\1{REDACTED}", text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        # Never raise here: a filter's exception would reach the code that logged.
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} (the arguments of this message could not be formatted)"
        if isinstance(record.args, tuple) and hasattr(record, "fields"):
            # The arguments go below: kept aside for the JSON format's keys, which it masks (only it, and only
            # then: the text format has no use for them, and the delivery log is on the hot path).
            record.field_args = record.args
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXCEPTIONS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _mask_webhook_url(match: re.Match[str]) -> str:
    opening = _OPENING_QUOTE.match(match[2])
    return f"{match[1]}{opening[0] if opening else ''}{REDACTED}"


class LineHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that writes the info lines logged on an event loop once per turn of the loop.

    Every write gives up the GIL for the system call, and on a busy daemon the writer thread takes it: the
    loop then waits for it back. Measured in the daemon at 16 senders, a delivery's line took ~160 us of
    the loop's wall time when written at once, ~60 us when written with the others of its turn (its CPU
    time the same, ~35 us). So a line logged below warning on a running loop waits, in order, until the
    loop's next turn, and that turn writes all the lines waiting in one write. A warning or an error, and
    any line logged off a loop (the writer thread, the CLI), is written at once, after the lines waiting,
    as is everything on ``flush`` (logging.shutdown calls it when the process exits, cleanly or on an
    exception). What a ``kill -9`` can lose beyond a line-by-line handler: the info lines of the loop's
    turn in progress.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        # The loop that has a write of the waiting lines scheduled, if one has.
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Under the handler's lock (Handler.handle).
        try:
            line = self.format(record) + self.terminator
            loop = asyncio.events._get_running_loop()
            if loop is None or record.levelno >= logging.WARNING:
                self._write(line)
                return
            self._waiting.append(line)
            if self._scheduled_on is not loop:
                self._scheduled_on = loop
                loop.call_soon(self._write_waiting)
        except RecursionError:  # as StreamHandler: the record's own recursion is not a logging error
            raise
        except Exception:
            self.handleError(record)

    def _write(self, line: str = "") -> None:
        if self._waiting:
            line = "".join(self._waiting) + line
            self._waiting.clear()
        if line:
            self.stream.write(line)
            self.stream.flush()

    def _write_waiting(self) -> None:
        self.acquire()
        try:
            self._scheduled_on = None
            self._write()
        except Exception:
            # The stream failed (closed, full disk): as a failed emit, reported once, never raised into the loop.
            self.handleError(logging.makeLogRecord({"msg": "the waiting log lines could not be written"}))
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
            super().flush()
        finally:
            self.release()


class _EverySecond:
    """A record's time to the second, formatted by ``render`` once a second instead of once a line (a
    strftime is a fifth of the cost of a delivery's line). Called under the handler's lock."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self.render = render
        self.last: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second = int(created)
        last = self.last
        if last[0] != second:
            last = self.last = (second, self.render(second))
        return last[1]


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, written out: ``2026-01-02 03:04:05,678 INFO transcriptd.deliveries: ...``, local time."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._seconds = _EverySecond(lambda second: time.strftime(self.default_time_format, self.converter(second)))

    def usesTime(self) -> bool:
        return True

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"  # default_msec_format

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO-8601 UTC), ``level``, ``logger``, ``message``, and ``exc``.

    A record logged with ``extra={"fields": names}`` also carries each %-argument under its name (the
    delivery log's ``conversation``, ``outcome``, ``latency_ms``...), masked like the message by ``mask``.
    """

    def __init__(self, mask: RedactSecrets | None = None) -> None:
        super().__init__()
        self.mask = mask
        self._seconds = _EverySecond(_utc_second)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _fields(record, self.mask):
            entry.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(entry).decode()


def _fields(record: logging.LogRecord, mask: RedactSecrets | None) -> Iterator[tuple[str, object]]:
    """(name, value) of each argument of a record logged with ``extra={"fields": names}``, strings masked."""
    fields = getattr(record, "fields", None)
    # field_args: kept by the mask filter, which emptied args; args: no filter saw the record.
    args = getattr(record, "field_args", record.args)
    if fields is None or not isinstance(args, tuple):
        return
    for name, value in zip(fields, args, strict=False):
        yield name, mask.redact(value) if mask is not None and isinstance(value, str) else value
