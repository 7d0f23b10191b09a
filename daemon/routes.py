"""Every HTTP endpoint, once: the routes and the OpenAPI description are both built from this table.

The intake endpoints come from the source registry (daemon.sources): one per path of each source."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.api import ConversationPage, ConversationsQuery, MessagePage, MessagesQuery
from daemon.erasing import ErasedAnswer
from daemon.feed import ChangePage, ChangesQuery, StreamQuery
from daemon.health import Readiness
from daemon.ids import PARAM, RawPathRoute
from daemon.intake import Dropped, Enqueued, Stored
from daemon.sources import SOURCES, Source
from daemon.timeline import EventPage, EventsQuery
from storage.queries import Conversation

Handler = Callable[[Request], Awaitable[Response]]

INTAKE_ERRORS = {
    400: "the body is not JSON, the id in the path is not UTF-8 once percent-decoded, or a `webhook-id` or"
    " `Idempotency-Key` header over 256 characters",
    401: "missing or wrong token",
    408: "the body did not all arrive within `server.body_timeout_s`",
    413: "the body is over `ingest.max_body_bytes`",
    422: "valid JSON of the wrong shape; the valid part was stored (see `accepted`)",
    503: "overloaded, shutting down or storage unavailable: retry after `Retry-After` seconds",
}
INTAKE_ANSWERS: dict[int, tuple[str, Any]] = {
    200: ("stored (durable mode), or dropped because the conversation was erased", Stored | Dropped),
    202: ("in the mailbox (enqueued mode)", Enqueued),
}
READ_ERRORS = {401: "missing or wrong bearer token (when `api.token` is set)", 422: "a bad query parameter"}
ID_READ_ERRORS = {400: "the id in the path is not UTF-8 once percent-decoded", **READ_ERRORS}


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
    source: Source[Any] | None = None  # an intake endpoint: the handler receives this source's deliveries
    operation: str = ""  # OpenAPI operationId (default: the target's method name)

    @property
    def operation_id(self) -> str:
        return self.operation or self.target[1]

    def handler(self) -> Handler:
        holder, method = self.target
        source = self.source
        if source is not None:

            async def receive(request: Request) -> Response:
                return await getattr(request.app.state, holder).receive(request, source)  # type: ignore[no-any-return]

            return receive

        async def handle(request: Request) -> Response:
            target: Handler = getattr(getattr(request.app.state, holder), method)
            return await target(request)

        return handle


def routes(endpoints: list[Endpoint]) -> list[Route]:
    """One route per path, whatever its methods, so a 405 lists every method the path allows; and the same
    again with a trailing slash. The app turns Starlette's slash redirects off (``redirect_slashes=False``):
    a redirect would echo the path, and ``/webhooks/tavus/<token>/`` holds a secret, into ``Location``, and
    a sender that does not follow it would lose the delivery."""
    by_path: dict[str, dict[str, Handler]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint.handler()
    built = []
    for path, handlers in by_path.items():

        async def dispatch(request: Request, handlers: dict[str, Handler] = handlers) -> Response:
            return await handlers[request.method if request.method != "HEAD" else "GET"](request)

        # A path with a conversation id matches on the raw path, so that an id holding "/" (%2F) still fits.
        kind = RawPathRoute if "{" + PARAM + "}" in path else Route
        built.append(_anchored(kind(path, dispatch, methods=list(handlers))))
        # The same with a trailing slash: nothing redirects, so no token ever lands in a Location header.
        built.append(_anchored(kind(f"{path}/", dispatch, methods=list(handlers))))
    return built


def _anchored(route: Route) -> Route:
    """Starlette ends a path's pattern with ``$``, which also matches before a final newline: ``/conversations/%0A``
    would be the list with a slash, not the conversation ``"\\n"``. ``\\Z`` ends at the end only."""
    pattern = route.path_regex.pattern
    if pattern.endswith("$"):
        route.path_regex = re.compile(pattern[:-1] + r"\Z")
    return route


def intake_endpoints(source: Source[Any]) -> list[Endpoint]:
    """A source's POST endpoints: its own path, or /webhooks/<name> and the form with the path token."""
    built = []
    for path in source.paths:
        with_token = "{token}" in path
        summary = source.title
        if source.path is None:
            summary += (
                f", with the token of `webhooks.{source.name}.token` in the path"
                if with_token
                else f" (when `webhooks.{source.name}.token` is not set)"
            )
        built.append(
            Endpoint(
                path,
                "POST",
                ("intake", "receive"),
                summary,
                "intake",
                body=source.body,
                responses=INTAKE_ANSWERS,
                errors=INTAKE_ERRORS,
                bearer=source.bearer,
                source=source,
                operation=source.operation_id + ("_with_token" if with_token else ""),
            )
        )
    return built


ENDPOINTS = [
    *(endpoint for source in SOURCES for endpoint in intake_endpoints(source)),
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
        errors={**ID_READ_ERRORS, 404: "no such conversation"},
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
        errors={**ID_READ_ERRORS, 404: "no such conversation"},
        bearer=True,
    ),
    Endpoint(
        "/conversations/{conversation_id}/events",
        "GET",
        ("timeline", "list_events"),
        "A conversation's delivery timeline: each event stored (stored or partial) or refused by the database "
        "(failed), in arrival order, with its raw body (masked) on request",
        "read",
        query=EventsQuery,
        responses={200: ("a page of the timeline", EventPage)},
        errors={**ID_READ_ERRORS, 404: "nothing received for this id"},
        bearer=True,
    ),
    Endpoint(
        "/changes",
        "GET",
        ("feed", "list_changes"),
        "The change feed: every change committed after a position, in position order (one per conversation "
        "per commit); `wait` long-polls until one comes",
        "feed",
        query=ChangesQuery,
        responses={200: ("a page of changes and the `next` position", ChangePage)},
        errors=READ_ERRORS,
        bearer=True,
    ),
    Endpoint(
        "/changes/stream",
        "GET",
        ("feed", "stream"),
        "The change feed as Server-Sent Events (`id:` the position, `event: change`, `data:` the change), "
        "resuming after `Last-Event-ID`; a comment line every `changes.heartbeat_s` while idle",
        "feed",
        query=StreamQuery,
        responses={200: ("an event stream (text/event-stream)", None)},
        errors={**READ_ERRORS, 422: "a bad query parameter or `Last-Event-ID`"},
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
        errors={401: "missing or wrong bearer token (when `api.token` or `api.metrics_token` is set)"},
        bearer=True,
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
