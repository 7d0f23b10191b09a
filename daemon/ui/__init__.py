"""The transcript viewer: server-rendered pages under ``/ui/`` (see :mod:`daemon.ui.pages`).

Its routes are kept out of :data:`daemon.routes.ENDPOINTS`: they are pages for people, not part of the JSON
API that ``/openapi.json`` describes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from daemon.ids import RawPathRoute
from daemon.routes import anchored

Handler = Callable[[Request], Awaitable[Response]]


def _page(method: str) -> Handler:
    async def handle(request: Request) -> Response:
        target: Handler = getattr(request.app.state.viewer, method)
        return await target(request)

    return handle


async def _to_viewer(request: Request) -> Response:
    """``/`` leads a browser to the viewer (a fixed path: nothing of the request goes into ``Location``)."""
    return RedirectResponse("/ui/", status_code=303)


_PAGES: list[tuple[str, str, list[str]]] = [
    ("/ui", "conversations", ["GET"]),
    ("/ui/conversations/{conversation_id}", "conversation", ["GET"]),
    ("/ui/conversations/{conversation_id}/events", "events", ["GET"]),
    ("/ui/conversations/{conversation_id}/events/{kind}/{row_id}", "event_body", ["GET"]),
    ("/ui/search", "search", ["GET"]),
    ("/ui/login", "login_form", ["GET"]),
    ("/ui/static/viewer.css", "stylesheet", ["GET"]),
]


def _routes() -> list[BaseRoute]:
    built: list[BaseRoute] = [anchored(Route("/", _to_viewer, methods=["GET"]))]
    for path, method, methods in _PAGES:
        kind = RawPathRoute if "{conversation_id}" in path else Route
        built.append(anchored(kind(path, _page(method), methods=methods)))
        built.append(anchored(kind(f"{path}/", _page(method), methods=methods)))
    # The forms' targets: POST only, so their paths answer GET with the page above and POST here.
    built.append(anchored(Route("/ui/login", _page("login"), methods=["POST"])))
    built.append(anchored(Route("/ui/logout", _page("logout"), methods=["POST"])))
    return built


ROUTES = _routes()
