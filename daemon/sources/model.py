"""What every source shares: the `Source` declaration, its settings' base, and the normalised message.

A source is one kind of sender (a vendor's post-call webhooks, or the generic endpoint). Its module
declares one ``SOURCE = Source(...)``; ``daemon.sources.SOURCES`` lists them, and routes, replay,
metrics labels, the read API's ``?source=``, OpenAPI, settings and log masking are all built from that
list. See docs/adding-a-source.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, Protocol, TypeVar, get_args

import msgspec

from daemon.errors import Problem
from storage.deliveries import Record, Rows, vendor_row
from storage.replay import StoredEvent

if TYPE_CHECKING:
    from daemon.vendor_http import VendorHttp

ConversationId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# A role as the sender wrote it; `NormalRole` is what the read API speaks.
Role = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
NormalRole = Literal["system", "user", "assistant", "tool"]
NORMAL_ROLES: frozenset[str] = frozenset(get_args(NormalRole))

# A setting holding a secret: masked in logs wherever it appears, and never echoed in an error.
SECRET = msgspec.Meta(extra={"secret": True})
Secret = Annotated[str, SECRET]


def is_secret(annotation: Any) -> bool:
    """Whether a settings field's type is marked ``Secret``."""
    return any(isinstance(meta, msgspec.Meta) and (meta.extra or {}).get("secret") for meta in get_args(annotation))


class WebhookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``webhooks.<source>.*``: every webhook source has a path token; its subclass adds the rest."""

    # If set, the vendor must post to /webhooks/<source>/<token>; compared in constant time.
    token: Secret = ""


S = TypeVar("S", bound=WebhookSettings)

# Checks a request's raw body and headers (before anything is decoded); raises `Unauthorized` naming
# the failed check. Built once at start-up from the source's settings, or None when nothing is to check.
Verify = Callable[[bytes, Mapping[str, str]], None]
# parse(body, headers, *, received_at, **path parameters other than the token) -> (record, problems).
# Only malformed JSON or an envelope without a usable conversation id raises; past that, problems are
# listed and the good part of the body is still delivered.
Parse = Callable[..., tuple[Record, list[Problem]]]
# The record a stored event makes again (transcriptd replay, dead-letters retry): no headers then.
Replay = Callable[[StoredEvent], Record]


@dataclass(frozen=True, slots=True)
class Message:
    """One normalised message of a source whose roles are mapped, at ``seq`` in its stream; the fields the
    vendor does not give stay None."""

    seq: int
    role: NormalRole
    vendor_role: str  # as the vendor wrote it: kept where it says more than ``role``
    content: str
    timestamp: float | None = None  # Unix seconds
    seconds_from_start: float | None = None
    duration: float | None = None


def message_rows(conversation_id: str, source: str, messages: Iterable[Message], created_at: float) -> Rows:
    """The rows ``messages`` store (storage.deliveries.VendorMessageRow)."""
    return [
        vendor_row(
            conversation_id,
            source,
            m.seq,
            m.role,
            m.content,
            m.vendor_role,
            created_at,
            timestamp=m.timestamp,
            seconds_from_start=m.seconds_from_start,
            duration=m.duration,
        )
        for m in messages
    ]


@dataclass(frozen=True, slots=True)
class Listed:
    """One conversation in the vendor's list of recent ones."""

    conversation_id: str
    started_at: float | None  # Unix seconds, when the vendor says
    ended: bool  # the vendor says it is over: what it holds now is all there will be


@dataclass(frozen=True, slots=True)
class Fetched:
    """One conversation fetched back: the bodies its webhooks would have carried, in the order they
    would have come, each to be parsed by the source's own ``parse``."""

    conversation_id: str
    bodies: list[bytes]
    ended: bool


class VendorClient(Protocol):
    """What reconcile asks of a vendor's API."""

    def recent(self, since: float) -> AsyncIterator[Listed]:
        """The conversations started at or after ``since`` (Unix seconds), paging through the list."""
        ...

    async def fetch(self, conversation_id: str) -> Fetched:
        """One conversation with everything its webhooks would have carried."""
        ...


@dataclass(frozen=True, slots=True)
class ApiClient:
    """A source's API client part. Its settings hold ``api_key`` (a ``Secret``) and ``api_url`` (the
    vendor's default)."""

    headers: Callable[[str], dict[str, str]]  # the request headers carrying the API key
    build: Callable[[VendorHttp], VendorClient]
    calls: str  # what a reconcile costs in API calls, for the docs and --help


@dataclass(frozen=True, slots=True)
class Source(Generic[S]):
    """One source: everything the rest of the daemon needs to know about it."""

    name: str  # stored in conversations.source and messages.source; also webhooks.<name> and the path
    title: str  # what it receives, for OpenAPI ("A Tavus conversation callback")
    parse: Parse
    replay: Replay
    events: frozenset[str]  # event types it knows: metrics label them, any other is "other"
    body: Any  # the request body's type, for OpenAPI
    settings: type[S] | None  # the webhooks.<name> section; None for a source without one
    authenticate: Callable[[S], Verify | None] | None = None
    # None: POST /webhooks/<name>, and /webhooks/<name>/{token} (used when webhooks.<name>.token is set).
    path: str | None = None
    bearer: bool = False  # guarded by api.token (Authorization: Bearer) instead of a path token
    operation: str = ""  # OpenAPI operationId; default "<name>_webhook"
    # When parsing depends on settings (what the raw event keeps, say): the parser for them, built once at
    # start-up; intake then uses it instead of ``parse`` (replay still uses ``replay``).
    parse_with: Callable[[S], Parse] | None = None
    # The largest body this source takes, from its settings, instead of ingest.max_body_bytes.
    max_body_bytes: Callable[[S], int] | None = None
    # The status of an enqueued answer (ingest.ack = "enqueued"): 202, unless the vendor counts only a 200
    # as delivered (ElevenLabs), when the body still says "enqueued".
    enqueued_status: Literal[200, 202] = 202
    api: ApiClient | None = None  # fetching back what a webhook missed (reconcile); None: no vendor API

    @property
    def paths(self) -> tuple[str, ...]:
        if self.path is not None:
            return (self.path,)
        return (f"/webhooks/{self.name}", f"/webhooks/{self.name}/{{token}}")

    @property
    def operation_id(self) -> str:
        return self.operation or f"{self.name}_webhook"

    def settings_in(self, webhooks: Any) -> S | None:
        """This source's section of the ``webhooks`` settings."""
        return None if self.settings is None else getattr(webhooks, self.name)

    def api_key(self, webhooks: Any) -> str:
        """``webhooks.<name>.api_key``, or "" when unset or the source has no API client."""
        settings = self.settings_in(webhooks)
        return getattr(settings, "api_key", "") if self.api is not None else ""

    def parser(self, webhooks: Any) -> Parse:
        settings = self.settings_in(webhooks)
        if settings is None or self.parse_with is None:
            return self.parse
        return self.parse_with(settings)

    def body_limit(self, webhooks: Any, default: int) -> int:
        settings = self.settings_in(webhooks)
        if settings is None or self.max_body_bytes is None:
            return default
        return self.max_body_bytes(settings)

    def verifier(self, webhooks: Any) -> Verify | None:
        settings = self.settings_in(webhooks)
        if settings is None or self.authenticate is None:
            return None
        return self.authenticate(settings)


def replay_with(parse: Parse) -> Replay:
    """The replay parser of a source whose ``parse`` needs nothing but the body."""

    def replay(event: StoredEvent) -> Record:
        return parse(event.body, {}, received_at=event.received_at)[0]

    return replay
