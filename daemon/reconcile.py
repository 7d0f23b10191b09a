"""Reconcile: fetch back from a vendor's API what its webhooks did not deliver, and store it the same way.

A fetched conversation becomes the webhook bodies the vendor would have posted, each parsed by the
source's own ``parse``: the same rows and conversation fields as the webhook path, so a conversation
fetched first and its late webhook (or the other way round) converge.

Delivery keys. A transcript's rows are keyed by position (``seq``), a conversation's fields are an
upsert, so a fetched body and a webhook body of the same event store every message once whatever their
raw bytes. The raw event of a fetch is kept under a key of its own, ``<source>:fetched:sha256:<hex of
the rebuilt body>``: a second fetch of unchanged data is a duplicate delivery, and the late webhook's own
raw body is still kept in the audit log (it adds an event row, never a message or a changed field).
Where the source's parser sets a key of its own (Tavus's one key for both join events, Vapi's per call
and message type), that key is kept: the late webhook then hits it and adds nothing at all.

Used by ``transcriptd reconcile`` (its own writer connection) and by the daemon's reconciler (the
actors): both hand ``deliveries_of`` to their store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from daemon.decoding import delivery_key
from daemon.errors import InvalidPayload, MalformedJSON
from daemon.sources.model import Fetched, Source
from daemon.vendor_http import HttpPolicy, VendorHttp
from storage.deliveries import Record, WriteResult
from storage.portable import fetch_all
from storage.surface import Erasure

# A conversation is complete here when it has ended (or failed) and holds its transcript; a failed call
# (never connected) may have none.
LOCAL_STATE = "SELECT id, status, message_count FROM conversations WHERE source = ? AND id IN ({})"
# Conversations that started here (a join, a status) and have no transcript yet.
WAITING = """
SELECT id FROM conversations
WHERE source = ? AND message_count = 0 AND status != 'failed'
  AND coalesce(started_at, created_at) <= ? AND created_at >= ?
ORDER BY created_at
LIMIT ?
"""
_CHUNK = 500  # ids per IN (...): under SQLite's parameter limit
ERASED = "erased"  # a conversation with a tombstone (transcriptd delete)


@dataclass(frozen=True, slots=True)
class Local:
    status: str
    message_count: int

    @property
    def complete(self) -> bool:
        # Erased on purpose (transcriptd delete): never fetched back; the writer would drop it anyway.
        return self.status in ("failed", ERASED) or (self.status == "ended" and self.message_count > 0)


def local_state(conn: Any, source: str, ids: Iterable[str], erasure: Erasure[Any]) -> dict[str, Local]:
    """What this database holds of ``ids``: status and message count, by id (absent: nothing here)."""
    wanted, found = list(dict.fromkeys(ids)), {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        query = LOCAL_STATE.format(", ".join("?" * len(chunk)))
        for cid, status, count in fetch_all(conn, query, (source, *chunk)):
            found[cid] = Local(status, count)
    for cid in erasure.tombstoned(conn, wanted):
        found[cid] = Local(ERASED, 0)
    return found


def waiting(conn: Any, source: str, *, started_before: float, since: float, limit: int) -> list[str]:
    return [cid for (cid,) in fetch_all(conn, WAITING, (source, started_before, since, limit))]


def fetched_key(source: str, body: bytes) -> str:
    return f"{source}:fetched:sha256:{hashlib.sha256(body).hexdigest()}"


def deliveries_of(
    source: Source[Any], webhooks: Any, fetched: Fetched, received_at: float
) -> tuple[list[Record], list[str]]:
    """The delivery records the fetched bodies make, each parsed by the parser intake uses for the source (with
    its ``webhooks.<name>`` settings), and what was wrong with any of them (a body the parser refuses is
    named, the others still go)."""
    parse = source.parser(webhooks)
    deliveries: list[Record] = []
    problems: list[str] = []
    for body in fetched.bodies:
        try:
            delivery, found = parse(body, {}, received_at=received_at)
        except (MalformedJSON, InvalidPayload) as exc:
            problems.append(f"{exc.__class__.__name__}: {exc}")
            continue
        problems.extend(f"{problem.field}: {problem.message}" for problem in found)
        if delivery.conversation_id != fetched.conversation_id:
            problems.append(f"an event of conversation {delivery.conversation_id!r} in its answer: skipped")
            continue
        # The parser's own key where it set one (see the module's docstring); else one for fetched bodies.
        if delivery.key == delivery_key(source.name, body, {}, delivery.conversation_id):
            delivery = msgspec.structs.replace(delivery, key=fetched_key(source.name, body))
        deliveries.append(delivery)
    return deliveries, problems


@dataclass(slots=True)
class Tally:
    """What one reconcile of one source found and did."""

    listed: int = 0  # conversations the vendor listed in the window (or asked for by id)
    missing: int = 0  # of them, missing here or incomplete
    fetched: int = 0  # fetched from the vendor's API
    stored: int = 0  # conversations that changed here
    messages: int = 0  # messages inserted
    updated: int = 0  # messages rewritten
    in_progress: int = 0  # still going at the vendor: fetched what there is, to finish later
    failed: dict[str, str] = field(default_factory=dict)  # conversation id -> why it could not be completed

    def count(self, results: Iterable[WriteResult]) -> None:
        changed = False
        for result in results:
            self.messages += result.inserted
            self.updated += result.updated
            changed = changed or not result.duplicate_delivery
        self.stored += changed


def vendor_http(source: Source[Any], webhooks: Any, policy: HttpPolicy) -> VendorHttp | None:
    """The source's API over HTTP, or None when it has no API client or ``webhooks.<name>.api_key`` is unset."""
    key = source.api_key(webhooks)
    if source.api is None or not key:
        return None
    url = getattr(source.settings_in(webhooks), "api_url", "")
    return VendorHttp(source.name, url, source.api.headers(key), policy)
