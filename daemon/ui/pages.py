"""The viewer's pages under ``/ui/``: the conversations, one conversation as a chat, its delivery timeline,
one raw body, and sign-in. Reads go through the JSON API's own :class:`~daemon.api.Api` (and so its cache)
and :class:`~daemon.timeline.Timeline`; a page is their answer rendered as HTML.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from daemon.api import MAX_PAGE, Api, MessagePage, MessagesQuery, parse_query_params
from daemon.auth import same_secret
from daemon.errors import (
    InvalidPayload,
    NotFound,
    Problem,
    TranscriptdError,
    Unauthorized,
    from_storage,
    log_rejection,
)
from daemon.ids import path_id
from daemon.search_api import Search, run, search_query
from daemon.sources import NAMES
from daemon.timeline import EventsQuery, Timeline
from daemon.ui import session
from daemon.ui.render import STYLESHEET, environment
from storage.errors import StorageError
from storage.queries import Message

# A conversation page shows its whole transcript up to this many messages (pages of the API's largest size,
# each from the cache); a longer one continues on a following page.
MAX_TRANSCRIPT_PAGES = 20
PAGE_SIZE = 50
_KINDS = {"event": 0, "dead-letter": 1}

Page = Callable[[Request], Awaitable[Response]]


class Viewer:
    def __init__(self, api: Api, timeline: Timeline, search: Search, token: str, *, retry_after_s: int = 1) -> None:
        self.api = api
        self.timeline = timeline
        self.search_api = search
        self.token = token
        self.retry_after_s = retry_after_s
        self.templates = environment()
        self.templates.globals["search_enabled"] = search.enabled

    # --- the pages ------------------------------------------------------------------------------

    async def conversations(self, request: Request) -> Response:
        return await self._guarded(request, self._conversations)

    async def conversation(self, request: Request) -> Response:
        return await self._guarded(request, self._conversation)

    async def events(self, request: Request) -> Response:
        return await self._guarded(request, self._events)

    async def event_body(self, request: Request) -> Response:
        return await self._guarded(request, self._event_body)

    async def search(self, request: Request) -> Response:
        return await self._guarded(request, self._search)

    async def _conversations(self, request: Request) -> Response:
        given = {name: value for name, value in request.query_params.items() if value != ""}
        # The form's metadata pair becomes the API's `metadata.<key>=<value>`.
        key, value = given.pop("key", None), given.pop("value", None)
        if key is not None:
            given[f"metadata.{key}"] = value or ""
        elif value is not None:
            raise InvalidPayload([Problem("a metadata value needs its key", "query.key")])
        given.setdefault("limit", str(PAGE_SIZE))
        page = await self.api.conversation_page(given)
        following = None if page.next is None else "/ui/?" + page.next.partition("?")[2]
        return self._render(
            request,
            "conversations.html",
            conversations=page.conversations,
            following=following,
            chosen=given,
            metadata_key=key or "",
            metadata_value=value or "",
            sources=NAMES,
        )

    async def _conversation(self, request: Request) -> Response:
        conversation = await self.api.conversation(path_id(request))
        params = dict(request.query_params)
        source = params.pop("source", None) or None
        after_text = params.pop("after", None)
        if params:
            raise InvalidPayload([Problem("unknown query parameter", f"query.{sorted(params)[0][:80]}")])
        query = parse_query_params(
            {"limit": str(MAX_PAGE), "include_system": "true"}
            | ({"source": source} if source else {})
            | ({"after": after_text} if after_text else {}),
            MessagesQuery,
        )
        messages: list[Message] = []
        more = None
        for _ in range(MAX_TRANSCRIPT_PAGES):
            page = msgspec.json.decode(await self.api.message_page(conversation, query), type=MessagePage)
            messages += page.messages
            if page.next is None:
                break
            query = msgspec.structs.replace(query, after=page.messages[-1].seq)
        else:
            more = {"after": messages[-1].seq} | ({"source": source} if source else {})
        return self._render(
            request,
            "conversation.html",
            conversation=conversation,
            messages=messages,
            stream=query.source or conversation.source,
            following=None if more is None else f"?{urlencode(more)}",
        )

    async def _search(self, request: Request) -> Response:
        given = {name: value for name, value in request.query_params.items() if value != ""}
        if not self.search_api.enabled:
            raise NotFound("search is turned off (search.enabled = false)")
        if "q" not in given:
            return self._render(request, "search.html", chosen=given, found=None, following=None, sources=NAMES)
        given.setdefault("limit", str(PAGE_SIZE // 2))
        found = await run(self.search_api.reader, search_query(given))
        following = None
        if found.next is not None:
            following = "/ui/search?" + urlencode(given | {"cursor": found.next})
        return self._render(request, "search.html", chosen=given, found=found, following=following, sources=NAMES)

    async def _events(self, request: Request) -> Response:
        cid = path_id(request)
        query = parse_query_params(dict(request.query_params) | {"limit": str(PAGE_SIZE)}, EventsQuery)
        rows, cursor = await self.timeline.rows(cid, query)
        entries = [(kind_name(kind), row_id, entry) for kind, row_id, entry in rows]
        following = None if cursor is None else f"?{urlencode({'cursor': cursor})}"
        return self._render(request, "events.html", cid=cid, entries=entries, following=following)

    async def _event_body(self, request: Request) -> Response:
        cid = path_id(request)
        kind = _KINDS.get(request.path_params["kind"])
        row_id = request.path_params["row_id"]
        if kind is None or not row_id.isascii() or not row_id.isdigit() or len(row_id) > 18:
            raise NotFound("no such delivery")
        body = await self.timeline.body(cid, kind, int(row_id))
        return self._render(
            request, "event_body.html", cid=cid, kind=request.path_params["kind"], row_id=int(row_id), body=body
        )

    # --- sign-in ----------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if not self.token:
            return RedirectResponse("/ui/", status_code=303, headers=session.SECURITY_HEADERS)
        next_path = session.safe_next(request.query_params.get("next"))
        return self._login(request, next_path, status=200)

    async def login(self, request: Request) -> Response:
        try:
            session.check_same_origin(request)
            form = await session.read_form(request)
        except TranscriptdError as exc:
            return self._error(request, exc)
        next_path = session.safe_next(form.get("next"))
        if not self.token:
            return RedirectResponse(next_path, status_code=303, headers=session.SECURITY_HEADERS)
        if not same_secret(form.get("token", ""), self.token):
            log_rejection(request, Unauthorized("wrong token"))  # one line, as for the API: never the token
            return self._login(request, next_path, status=401, wrong=True)
        response = RedirectResponse(next_path, status_code=303, headers=session.SECURITY_HEADERS)
        session.set_cookie(response, request, session.issue(self.token, time.time()), session.SESSION_S)
        return response

    async def logout(self, request: Request) -> Response:
        try:
            session.check_same_origin(request)
        except TranscriptdError as exc:
            return self._error(request, exc)
        response = RedirectResponse("/ui/login", status_code=303, headers=session.SECURITY_HEADERS)
        session.set_cookie(response, request, "", 0)
        return response

    async def stylesheet(self, request: Request) -> Response:
        # Open without a session: the sign-in page needs it, and it holds no data.
        headers = session.SECURITY_HEADERS | {"Cache-Control": "public, max-age=3600"}
        return Response(STYLESHEET, media_type="text/css", headers=headers)

    # --- shared -------------------------------------------------------------------------------------

    async def _guarded(self, request: Request, page: Page) -> Response:
        """The page for a signed-in browser, the sign-in form (401) otherwise; errors as pages."""
        if not session.signed_in(request, self.token):
            return self._login(request, session.safe_next(_here(request)), status=401)
        try:
            return await page(request)
        except TranscriptdError as exc:
            return self._error(request, exc)
        except StorageError as exc:
            return self._error(request, from_storage(exc, retry_after_s=self.retry_after_s))

    def _login(self, request: Request, next_path: str, *, status: int, wrong: bool = False) -> Response:
        response = self._render(request, "login.html", status=status, next_path=next_path, wrong=wrong)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="transcriptd"'
        return response

    def _error(self, request: Request, error: TranscriptdError) -> Response:
        log_rejection(request, error)
        problems = getattr(error, "problems", [])
        response = self._render(request, "error.html", status=error.status, error=error, problems=problems)
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    def _render(self, request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        html = self.templates.get_template(name).render(
            signed_in=bool(self.token) and session.signed_in(request, self.token), **context
        )
        return HTMLResponse(html, status_code=status, headers=session.SECURITY_HEADERS | session.NO_STORE)


def kind_name(kind: int) -> str:
    return "dead-letter" if kind else "event"


def _here(request: Request) -> str:
    """This page's path and query, for coming back to it after signing in."""
    raw: bytes | None = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw is not None else request.url.path
    query = request.url.query
    return f"{path}?{query}" if query else path
