"""Every HTTP endpoint, once: the routes and the OpenAPI description are both built from this table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.api import ConversationPage, ConversationsQuery, MessagePage, MessagesQuery
from daemon.erasing import ErasedAnswer
from daemon.generic import IncomingMessage
from daemon.health import Readiness
from daemon.intake import Dropped, Enqueued, Stored
from daemon.tavus import Envelope
from storage.queries import Conversation

Handler = Callable[[Request], Awaitable[Response]]

INTAKE_ERRORS = {
    400: "the body is not JSON",
    401: "missing or wrong token",
    413: "the body is over `ingest.max_body_bytes`",
    422: "valid JSON of the wrong shape; the valid part was stored (see `accepted`)",
    503: "overloaded, shutting down or storage unavailable: retry after `Retry-After` seconds",
}
INTAKE_ANSWERS: dict[int, tuple[str, Any]] = {
    200: ("stored (durable mode), or dropped because the conversation was erased", Stored | Dropped),
    202: ("in the mailbox (enqueued mode)", Enqueued),
}
READ_ERRORS = {401: "missing or wrong bearer token (when `api.token` is set)", 422: "a bad query parameter"}


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    target: tuple[str, str]  # (attribute of app.state, method name): built by the lifespan
    summary: str
    tag: str
    query: type | None = None
    body: Any = None  # the request body's type
    responses: dict[int, tuple[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    bearer: bool = False

    def handler(self) -> Handler:
        holder, method = self.target

        async def handle(request: Request) -> Response:
            target: Handler = getattr(getattr(request.app.state, holder), method)
            return await target(request)

        return handle


def routes(endpoints: list[Endpoint]) -> list[Route]:
    """One route per path, whatever its methods, so a 405 lists every method the path allows."""
    by_path: dict[str, dict[str, Handler]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint.handler()
    built = []
    for path, handlers in by_path.items():

        async def dispatch(request: Request, handlers: dict[str, Handler] = handlers) -> Response:
            return await handlers[request.method if request.method != "HEAD" else "GET"](request)

        built.append(Route(path, dispatch, methods=list(handlers)))
    return built


ENDPOINTS = [
    Endpoint(
        "/webhooks/tavus",
        "POST",
        ("intake", "tavus_webhook"),
        "A Tavus conversation callback (when `webhooks.tavus.token` is not set)",
        "intake",
        body=Envelope,
        responses=INTAKE_ANSWERS,
        errors=INTAKE_ERRORS,
    ),
    Endpoint(
        "/webhooks/tavus/{token}",
        "POST",
        ("intake", "tavus_webhook"),
        "A Tavus conversation callback, with the token of `webhooks.tavus.token` in the path",
        "intake",
        body=Envelope,
        responses=INTAKE_ANSWERS,
        errors=INTAKE_ERRORS,
    ),
    Endpoint(
        "/conversations/{conversation_id}/messages",
        "POST",
        ("intake", "post_messages"),
        "Append one message or a list of them to a conversation",
        "intake",
        body=IncomingMessage | list[IncomingMessage],
        responses=INTAKE_ANSWERS,
        errors=INTAKE_ERRORS,
        bearer=True,
    ),
    Endpoint(
        "/conversations",
        "GET",
        ("api", "list_conversations"),
        "Conversations, newest activity first",
        "read",
        query=ConversationsQuery,
        responses={200: ("a page of conversations", ConversationPage)},
        errors=READ_ERRORS,
        bearer=True,
    ),
    Endpoint(
        "/conversations/{conversation_id}",
        "GET",
        ("api", "get_conversation"),
        "One conversation: status, replica, times, recording, analysis, post-call actions",
        "read",
        responses={200: ("the conversation", Conversation)},
        errors={**READ_ERRORS, 404: "no such conversation"},
        bearer=True,
    ),
    Endpoint(
        "/conversations/{conversation_id}",
        "DELETE",
        ("erasure", "delete_conversation"),
        "Erase a conversation: messages, raw events, dead letters, the record and its cached pages, in one "
        "transaction; a tombstone drops its later deliveries (answered 2xx, stored nowhere)",
        "erasure",
        responses={200: ("erased: what was removed, by kind", ErasedAnswer)},
        errors={
            401: READ_ERRORS[401],
            404: "no such conversation (nothing of it is stored)",
            422: "a bad conversation id",
            503: "storage unavailable: retry after `Retry-After` seconds",
        },
        bearer=True,
    ),
    Endpoint(
        "/conversations/{conversation_id}/messages",
        "GET",
        ("api", "list_messages"),
        "A conversation's messages by position, by page or after a cursor",
        "read",
        query=MessagesQuery,
        responses={200: ("a page of messages", MessagePage)},
        errors={**READ_ERRORS, 404: "no such conversation"},
        bearer=True,
    ),
    Endpoint("/livez", "GET", ("health", "livez"), "The process is up", "health", responses={200: ("alive", None)}),
    Endpoint(
        "/readyz",
        "GET",
        ("health", "readyz"),
        "Intake and the writer run and the database takes a commit now",
        "health",
        responses={200: ("ready", Readiness)},
        errors={503: "not ready: see `storage_error`"},
    ),
    Endpoint(
        "/metrics",
        "GET",
        ("metrics", "serve"),
        "Prometheus metrics (text format)",
        "health",
        responses={200: ("the metrics", None)},
    ),
    Endpoint(
        "/openapi.json",
        "GET",
        ("openapi", "serve"),
        "This description of the API",
        "health",
        responses={200: ("OpenAPI 3.1", None)},
    ),
]

ROUTES = routes(ENDPOINTS)
