"""Local stand-ins of the vendors' APIs for reconcile's tests: real HTTP servers on 127.0.0.1.

Each is a small Starlette app served by uvicorn in a thread, on a port of its own, answering the
documented response shapes. Faults are scripted per path: ``fail(prefix, status=429, retry_after="1")``
makes the next matching request answer that status, ``slow(prefix, seconds)`` delays the next one. Every
request is recorded (method, path, query, whether the key was right), so a test can see the retries and
the pages.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.loopback_server import serve_in_thread

# The API keys the stand-ins expect; they are in tests/conftest.py's TEST_SECRETS, so a log holding one fails.
TAVUS_KEY = "tavus-api-k3y-Secret"
VAPI_KEY = "vapi-private-k3y-Secret"
ELEVENLABS_KEY = "elevenlabs-xi-k3y-Secret"
RETELL_KEY = "key_retell-e2e-5a7c"  # webhooks.retell.api_key: it signs the webhooks and opens the API


@dataclass(slots=True)
class Fault:
    prefix: str
    status: int = 0  # 0: answer normally, after the delay
    retry_after: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str
    query: str
    status: int


@dataclass(slots=True)
class StandIn:
    """A vendor's API: ``conversations`` is what the vendor holds, by id, in the vendor's own shape."""

    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    base_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, prefix: str, status: int, retry_after: str | None = None, times: int = 1) -> None:
        with self.lock:
            self.faults.extend(Fault(prefix, status, retry_after) for _ in range(times))

    def slow(self, prefix: str, seconds: float) -> None:
        with self.lock:
            self.faults.append(Fault(prefix, delay_s=seconds))

    def requests_to(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)]

    def _fault(self, path: str) -> Fault | None:
        with self.lock:
            for index, fault in enumerate(self.faults):
                if path.startswith(fault.prefix):
                    return self.faults.pop(index)
        return None

    def _record(self, request: Request, status: int) -> None:
        with self.lock:
            self.seen.append(Seen(request.method, request.url.path, request.url.query, status))


# (stand-in, request, the request's JSON body or None) -> JSON-able, or a Response
Handler = Callable[[StandIn, Request, Any], Any]


def app_for(standin: StandIn, key_ok: Callable[[Request], bool], routes: list[tuple[str, str, Handler]]) -> Starlette:
    """An app serving ``routes`` (method, path, handler -> JSON-able or a Response) for ``standin``, behind
    the key check and the scripted faults."""

    def endpoint(handler: Handler) -> Callable[[Request], Any]:
        async def answer(request: Request) -> Response:
            fault = standin._fault(request.url.path)
            if fault is not None and fault.delay_s:
                await anyio.sleep(fault.delay_s)
            if not key_ok(request):
                response: Response = JSONResponse({"message": "Invalid access token"}, status_code=401)
            elif fault is not None and fault.status:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                response = JSONResponse({"message": "stand-in fault"}, status_code=fault.status, headers=headers)
            else:
                raw = await request.body()
                result = handler(standin, request, json.loads(raw) if raw else None)
                response = result if isinstance(result, Response) else JSONResponse(result)
            standin._record(request, response.status_code)
            return response

        return answer

    return Starlette(routes=[Route(path, endpoint(h), methods=[method]) for method, path, h in routes])


@contextmanager
def serving(standin: StandIn, app: Starlette) -> Iterator[StandIn]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread while the block runs; ``standin.base_url`` is set."""
    running = serve_in_thread(app, what="the vendor stand-in")
    standin.base_url = f"http://127.0.0.1:{running.port}"
    try:
        yield standin
    finally:
        running.stop()


# --- Tavus -------------------------------------------------------------------------------------------


def tavus_conversation(conversation_id: str, created_at: str, webhook_bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """A conversation as ``GET /v2/conversations/{id}?verbose=true`` answers it: the fields, and the events
    its callbacks carried, ``{event_type, message_type, properties, timestamp}`` each."""
    ended = any(b["event_type"] in ("system.shutdown", "application.transcription_ready") for b in webhook_bodies)
    return {
        "conversation_id": conversation_id,
        "conversation_name": f"A call {conversation_id}",
        "conversation_url": f"https://tavus.daily.co/{conversation_id}",
        "callback_url": "https://example.test/webhooks/tavus/s3cr3t-callback-token",
        "status": "ended" if ended else "active",
        "replica_id": "r79e1c033f",
        "persona_id": "p5317866",
        "created_at": created_at,
        "updated_at": created_at,
        "events": [
            {
                "event_type": b["event_type"],
                "message_type": b.get("message_type"),
                "properties": b["properties"],
                "timestamp": b.get("timestamp"),
                "created_at": created_at,  # a field the callback does not carry: ignored
            }
            for b in webhook_bodies
        ],
    }


def _tavus_list(standin: StandIn, request: Request, body: Any) -> Any:
    # Newest first, as the API lists them; this stand-in answers at most 25 a page whatever is asked.
    limit = min(int(request.query_params.get("limit", "10")), 25)
    page = int(request.query_params.get("page", "1"))
    items = sorted(standin.conversations.values(), key=lambda c: c["created_at"], reverse=True)
    chosen = items[(page - 1) * limit : page * limit]
    return {"data": [{k: v for k, v in c.items() if k != "events"} for c in chosen], "total_count": len(items)}


def _tavus_get(standin: StandIn, request: Request, body: Any) -> Any:
    conversation = standin.conversations.get(request.path_params["cid"])
    if conversation is None:
        return JSONResponse({"message": "Conversation not found"}, status_code=404)
    if request.query_params.get("verbose") != "true":
        return {k: v for k, v in conversation.items() if k != "events"}
    return conversation


@contextmanager
def tavus_api() -> Iterator[StandIn]:
    standin = StandIn()
    app = app_for(
        standin,
        lambda request: request.headers.get("x-api-key") == TAVUS_KEY,
        [("GET", "/v2/conversations", _tavus_list), ("GET", "/v2/conversations/{cid}", _tavus_get)],
    )
    with serving(standin, app):
        yield standin


# --- Vapi --------------------------------------------------------------------------------------------


def vapi_call(report: dict[str, Any], created_at: str) -> dict[str, Any]:
    """A Call as ``GET /call/{id}`` answers it, holding what its end-of-call report carried."""
    message = report["message"]
    artifact = message.get("artifact")
    return {
        "id": message["call"]["id"],
        "orgId": "org-standin",
        "type": "webCall",
        "status": "ended",
        "createdAt": created_at,
        "updatedAt": created_at,
        "startedAt": message.get("startedAt"),
        "endedAt": message.get("endedAt"),
        "endedReason": message.get("endedReason"),
        "cost": message.get("cost", 0.01),
        "analysis": message.get("analysis"),
        "artifact": artifact,
        "messages": (artifact or {}).get("messages"),  # deprecated copy of artifact.messages
    }


def _vapi_list(standin: StandIn, request: Request, body: Any) -> Any:
    # Newest first; at most 25 whatever is asked; createdAtGe / createdAtLe as ISO strings (same format, so
    # comparing the text compares the times).
    limit = min(int(request.query_params.get("limit", "100")), 25)
    ge, le = request.query_params.get("createdAtGe"), request.query_params.get("createdAtLe")
    calls = sorted(standin.conversations.values(), key=lambda c: c["createdAt"], reverse=True)
    calls = [c for c in calls if (ge is None or c["createdAt"] >= ge) and (le is None or c["createdAt"] <= le)]
    return calls[:limit]


def _vapi_get(standin: StandIn, request: Request, body: Any) -> Any:
    call = standin.conversations.get(request.path_params["cid"])
    if call is None:
        return JSONResponse({"message": "Not Found", "statusCode": 404}, status_code=404)
    return call


@contextmanager
def vapi_api() -> Iterator[StandIn]:
    standin = StandIn()
    app = app_for(
        standin,
        lambda request: request.headers.get("authorization") == f"Bearer {VAPI_KEY}",
        [("GET", "/call", _vapi_list), ("GET", "/call/{cid}", _vapi_get)],
    )
    with serving(standin, app):
        yield standin


# --- ElevenLabs --------------------------------------------------------------------------------------


def _elevenlabs_list(standin: StandIn, request: Request, body: Any) -> Any:
    after = int(request.query_params.get("call_start_after_unix", "0"))
    size = min(int(request.query_params.get("page_size", "30")), 25)
    start = int(request.query_params.get("cursor") or 0)
    items = sorted(standin.conversations.values(), key=lambda c: c["metadata"]["start_time_unix_secs"], reverse=True)
    items = [c for c in items if c["metadata"]["start_time_unix_secs"] >= after]
    page = items[start : start + size]
    more = start + size < len(items)
    summaries = [
        {
            "agent_id": c["agent_id"],
            "conversation_id": c["conversation_id"],
            "start_time_unix_secs": c["metadata"]["start_time_unix_secs"],
            "call_duration_secs": c["metadata"]["call_duration_secs"],
            "message_count": len(c["transcript"]),
            "status": c["status"],
            "call_successful": "success",
        }
        for c in page
    ]
    return {"conversations": summaries, "has_more": more, "next_cursor": str(start + size) if more else None}


def _elevenlabs_get(standin: StandIn, request: Request, body: Any) -> Any:
    conversation = standin.conversations.get(request.path_params["cid"])
    if conversation is None:
        return JSONResponse({"detail": {"status": "conversation_not_found"}}, status_code=404)
    return conversation


@contextmanager
def elevenlabs_api() -> Iterator[StandIn]:
    standin = StandIn()
    app = app_for(
        standin,
        lambda request: request.headers.get("xi-api-key") == ELEVENLABS_KEY,
        [
            ("GET", "/v1/convai/conversations", _elevenlabs_list),
            ("GET", "/v1/convai/conversations/{cid}", _elevenlabs_get),
        ],
    )
    with serving(standin, app):
        yield standin


# --- Retell ------------------------------------------------------------------------------------------


def _retell_list(standin: StandIn, request: Request, body: Any) -> Any:
    # POST /v3/list-calls: start_timestamp filter, newest first, at most 25 a page, an opaque cursor.
    body = body or {}
    lower = body.get("filter_criteria", {}).get("start_timestamp", {}).get("value", 0)
    limit = min(int(body.get("limit", 50)), 25)
    calls = sorted(standin.conversations.values(), key=lambda c: c["start_timestamp"], reverse=True)
    calls = [c for c in calls if c["start_timestamp"] >= lower]
    start = int(body.get("pagination_key") or 0)
    page = calls[start : start + limit]
    more = start + limit < len(calls)
    return {"items": page, "has_more": more, "pagination_key": str(start + limit) if more else None}


def _retell_get(standin: StandIn, request: Request, body: Any) -> Any:
    call = standin.conversations.get(request.path_params["cid"])
    if call is None:
        return JSONResponse({"status": "error", "message": "Not Found"}, status_code=404)
    return call


@contextmanager
def retell_api() -> Iterator[StandIn]:
    standin = StandIn()
    app = app_for(
        standin,
        lambda request: request.headers.get("authorization") == f"Bearer {RETELL_KEY}",
        [("POST", "/v3/list-calls", _retell_list), ("GET", "/v2/get-call/{cid}", _retell_get)],
    )
    with serving(standin, app):
        yield standin
