"""Conversation ids in URL paths: routed on the raw path, percent-decoded strictly, percent-encoded in links.

Starlette routes on ``scope["path"]``, which the server has already percent-decoded: an id holding ``/``
(``%2F``) then no longer fits its one path segment, and invalid UTF-8 (``%FF``) has become U+FFFD, so two
distinct ids would read as one. Routes with an id in their path match on ``scope["raw_path"]`` instead, and
the handler decodes the id's segment itself, refusing what is not UTF-8.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import Scope

from daemon.errors import MalformedId
from daemon.sources.generic import check_conversation_id

PARAM = "conversation_id"


class RawPathRoute(Route):
    """A route whose path parameters are matched, still percent-encoded, on the raw request path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return super().matches(scope)
        raw: bytes | None = scope.get("raw_path")
        # ASGI makes raw_path optional: without it, re-encode the decoded path (a "/" inside an id is lost then).
        encoded = raw.decode("latin-1") if raw is not None else quote(scope["path"], safe="/")
        return super().matches({**scope, "path": encoded, "root_path": ""})


def path_id(request: Request, name: str = PARAM) -> str:
    """The id in the path, percent-decoded as UTF-8 strictly: invalid UTF-8 is a 400, a bad length a 422."""
    segment: str = request.path_params[name]
    try:
        text = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedId(
            "the conversation id in the path is not UTF-8 once percent-decoded", field=f"path.{name}"
        ) from None
    return check_conversation_id(text)


def quoted(conversation_id: str) -> str:
    """The id as one path segment of a link: every reserved character percent-encoded (``/ ? # %`` included)."""
    segment = quote(conversation_id, safe="")
    # A segment "." or ".." would be resolved away by clients (RFC 3986 dot segments): encoded, it is kept.
    return "%2E" * len(segment) if segment in (".", "..") else segment
