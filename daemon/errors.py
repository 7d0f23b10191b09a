"""The exception hierarchy and its one mapping to HTTP.

Every error body has one shape: ``{"error": {"status", "code", "message", ["field"], ["problems"]}}``.
Client mistakes are 4xx; our own failures are 5xx (503 with ``Retry-After``) so that senders retry.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from storage.errors import StorageError, StorageRejected, StorageUnavailable, WriterClosed

# One line per request answered with an error: what, where from and how big, never the body, the token or the
# query string. The path is not logged either (``/webhooks/<source>/<token>`` holds a secret): only its source.
rejections = logging.getLogger("transcriptd.intake")


class Problem(msgspec.Struct, omit_defaults=True):
    """One thing wrong with a request, with the JSON path of the field where there is one."""

    message: str
    field: str | None = None


class TranscriptdError(Exception):
    """Base of every error transcriptd raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    retry_after: int | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class MalformedJSON(TranscriptdError):
    status, code = 400, "malformed_json"


class MalformedId(TranscriptdError):
    """An id in the path that is not UTF-8 once percent-decoded: it cannot name anything stored."""

    status, code = 400, "malformed_id"


class Unauthorized(TranscriptdError):
    status, code = 401, "unauthorized"


class NotFound(TranscriptdError):
    status, code = 404, "not_found"


class PayloadTooLarge(TranscriptdError):
    status, code = 413, "payload_too_large"


# Set in a request's scope by the server (daemon/server.py) when its body did not come in time: the server
# has answered 408 and ended the request, and the handler tells that end from a sender leaving.
BODY_TIMED_OUT = "transcriptd.body_timed_out"


class BodyTimeout(TranscriptdError):
    """The body did not all arrive in time (``server.body_timeout_s``): a Content-Length larger than what
    is sent, or a sender too slow to wait for. The server answered 408 and closes the connection."""

    status, code = 408, "body_timeout"


class ClientDisconnected(TranscriptdError):
    """The sender closed the connection before its body was read: its doing, and nobody is left to answer.
    Counted (``transcriptd_client_disconnected``) and logged in one line, never as an internal error."""

    status, code = 499, "client_disconnected"


class InvalidHeader(TranscriptdError):
    status, code = 400, "invalid_header"


class InvalidPayload(TranscriptdError):
    """The body is JSON but not of the expected shape; ``problems`` lists every field at fault."""

    status, code = 422, "invalid_payload"

    def __init__(self, problems: list[Problem], *, accepted: dict[str, Any] | None = None) -> None:
        first = problems[0]
        message = first.message if first.field is None else f"{first.message} (at {first.field})"
        if len(problems) > 1:
            message += f", and {len(problems) - 1} more problem(s)"
        super().__init__(message, field=first.field)
        self.problems = problems
        self.accepted = accepted

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["problems"] = msgspec.to_builtins(self.problems)
        if self.accepted is not None:
            # Everything valid in the same delivery was still taken: say what became of it.
            body["accepted"] = self.accepted
        return body


class Unavailable(TranscriptdError):
    """Transient: the sender should retry after ``retry_after`` seconds."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    code = "overloaded"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class StorageAckTimeout(Unavailable):
    code = "commit_timeout"


def error_response(error: TranscriptdError) -> Response:
    headers = dict(error.headers or {})
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return Response(
        msgspec.json.encode(error.body()),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


def request_source(path: str) -> str:
    """Which intake a path belongs to, by its source's segment alone: the rest may be a secret or an id."""
    # Imported here: every source module imports this one.
    from daemon.sources import BY_NAME

    if path.startswith("/webhooks/"):
        name = path.split("/", 3)[2]
        return name if name in BY_NAME else "other"
    if path == "/conversations" or path.startswith("/conversations/"):
        return "api"
    return "other"


def log_rejection(request: Request, error: TranscriptdError) -> None:
    size = request.headers.get("content-length", "")
    rejections.log(
        logging.WARNING if error.status >= 500 else logging.INFO,
        "rejected %s from %s: reason=%s status=%d size=%s",
        request.method if request.method.isalpha() else "?",
        request_source(request.scope.get("path", "")),
        error.code,
        error.status,
        size if size.isascii() and size.isdigit() else "-",
    )


def _counted(request: Request, error: TranscriptdError) -> Response:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(error.code).inc()
    log_rejection(request, error)
    return error_response(error)


async def handle_transcriptd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TranscriptdError)
    if isinstance(exc, ClientDisconnected):
        return _disconnected(request, exc)
    return _counted(request, exc)


def _disconnected(request: Request, error: TranscriptdError) -> Response:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.client_disconnected.inc()
    rejections.info(
        "sender of %s to %s disconnected before its body was read: %s",
        request.method if request.method.isalpha() else "?",
        request_source(request.scope.get("path", "")),
        error.message,
    )
    return error_response(error)  # nobody reads it: the server drops what goes to a closed connection


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientDisconnect)
    return _disconnected(request, ClientDisconnected("the sender went away before its body was read"))


def from_storage(exc: StorageError, *, retry_after_s: int = 1) -> TranscriptdError:
    """Storage failures are ours, never the sender's: 5xx, with a time to retry after (a 503's is
    ``ingest.retry_after_s``, as for every other 503)."""
    error: TranscriptdError
    match exc:
        case StorageUnavailable() | WriterClosed():
            error = Unavailable(str(exc), retry_after=retry_after_s)
            error.code = "storage_unavailable"
        case StorageRejected():
            # The database refused the rows: retrying soon will not help, retrying after a fix will.
            error = TranscriptdError(str(exc))
            error.code, error.retry_after = "storage_rejected", 60
        case _:
            error = TranscriptdError(str(exc))
            error.retry_after = 5
    return error


async def handle_storage_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StorageError)
    intake = getattr(request.app.state, "intake", None)  # absent only before the lifespan has started
    return _counted(request, from_storage(exc, retry_after_s=intake.settings.retry_after_s if intake else 1))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = TranscriptdError(exc.detail)
    error.status = exc.status_code
    error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = _counted(request, error)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Not logged here: Starlette re-raises after this response, and the server logs the traceback once.
    error = TranscriptdError("internal error; the request was not stored, please retry")
    error.retry_after = 5
    return _counted(request, error)


EXCEPTION_HANDLERS = {
    TranscriptdError: handle_transcriptd_error,
    StorageError: handle_storage_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,  # a handler reading the body with Starlette's own calls
    Exception: handle_unexpected,
}
