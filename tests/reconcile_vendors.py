"""Each vendor as reconcile's tests see it: its stand-in API, its key, and the webhook bodies of a call.

A case builds, for call ``i``, the bodies its webhooks carry (in the order the vendor sends them) and the
record the vendor's API holds for it; ``started`` is what arrives when the call starts (before the daemon
went down), so the reconciler has a conversation that "joined and went quiet".
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import TEST_SECRETS
from tests.retell_signing import sign as retell_sign
from tests.vendor_standin import (
    ELEVENLABS_KEY,
    RETELL_KEY,
    VAPI_KEY,
    StandIn,
    elevenlabs_api,
    retell_api,
    vapi_api,
    vapi_call,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ELEVENLABS_SECRET = TEST_SECRETS[TEST_SECRETS.index("wsec_transcriptd-test-elevenlabs-1")]


@dataclass(frozen=True)
class Call:
    conversation_id: str
    webhooks: list[bytes]  # every body its webhooks carry, in order
    started: list[bytes]  # the first of them: what arrives when the call starts
    record: dict[str, Any]  # what the vendor's API holds


@dataclass(frozen=True)
class VendorCase:
    name: str
    key: str
    api: Callable[[], AbstractContextManager[StandIn]]
    call: Callable[[int, float], Call]  # (index, created at, Unix seconds)
    list_path: str  # the list request's path, for the scripted 429
    get_path: Callable[[str], str]  # one conversation's path
    # The event a fetch rebuilds whose late webhook hits the fetch's own key (the source keys it by
    # conversation), so it adds no event row either; "" when the source keys by body.
    keyed_event: str
    webhook_settings: dict[str, Any] = field(default_factory=dict)
    sign: Callable[[bytes], dict[str, str]] = lambda body: {}

    @property
    def env(self) -> dict[str, str]:
        return {f"TRANSCRIPTD_WEBHOOKS_{self.name.upper()}_API_KEY": self.key}

    def url_env(self, standin: StandIn) -> dict[str, str]:
        return {**self.env, f"TRANSCRIPTD_WEBHOOKS_{self.name.upper()}_API_URL": standin.base_url}

    def settings(self, standin: StandIn) -> dict[str, Any]:
        return {f"webhooks.{self.name}.api_key": self.key, f"webhooks.{self.name}.api_url": standin.base_url}


def iso_ms(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Vapi: the schema-built end-of-call report with tool calls, one per call ------------------------------

_VAPI_REPORT = json.loads((FIXTURES / "vapi" / "schema-end-of-call-report-with-tools.json").read_text())


def vapi(i: int, created: float) -> Call:
    cid = f"vapi-call-{i:03d}"
    report = copy.deepcopy(_VAPI_REPORT)
    message = report["message"]
    message["call"]["id"] = cid
    message["startedAt"] = iso_ms(created)
    message["endedAt"] = iso_ms(created + 60 + i)
    message["timestamp"] = int((created + 61 + i) * 1000)
    message["analysis"]["summary"] = f"Call {i}: the caller asked for the weather."
    for turn in message["artifact"]["messages"]:
        if turn["role"] == "bot":
            turn["message"] = f"{turn['message']} ({i})"
    # status-update in-progress, sent as the call starts (its time is the call's start).
    status: dict[str, Any] = {"message": {"type": "status-update", "status": "in-progress", "call": {"id": cid}}}
    status["message"]["timestamp"] = int(created * 1000)
    bodies = [json.dumps(status).encode(), json.dumps(report).encode()]
    return Call(cid, bodies, bodies[:1], vapi_call(report, iso_ms(created)))


VAPI = VendorCase(
    name="vapi",
    key=VAPI_KEY,
    api=vapi_api,
    call=vapi,
    list_path="/call",
    get_path=lambda cid: f"/call/{cid}",
    keyed_event="end-of-call-report",
)

# --- Retell: the get-call example of the API reference, ended and analysed --------------------------------

_RETELL_CALL = json.loads((FIXTURES / "retell" / "api_reference_call.json").read_text())


def retell_headers(body: bytes) -> dict[str, str]:
    return {"x-retell-signature": retell_sign(body, RETELL_KEY)}


def retell(i: int, created: float) -> Call:
    cid = f"retell-call-{i:03d}"
    call = copy.deepcopy(_RETELL_CALL)
    call["call_id"] = cid
    call["call_status"] = "ended"
    call["start_timestamp"] = int(created * 1000)
    call["end_timestamp"] = int((created + 60 + i) * 1000)
    call["call_analysis"]["call_summary"] = f"Call {i}: the caller asked about an appointment."
    for turn in call["transcript_object"]:
        if turn["role"] == "agent":
            turn["content"] = f"{turn['content']} ({i})"
    # call_started: the call as it begins, with nothing said yet.
    later = ("end_timestamp", "call_analysis", "disconnection_reason", "duration_ms", "recording_url")
    started = {k: v for k, v in call.items() if k not in later and not k.startswith(("transcript", "scrubbed"))}
    started["call_status"] = "ongoing"
    ended = {k: v for k, v in call.items() if k != "call_analysis"}
    bodies = [
        json.dumps({"event": "call_started", "call": started}).encode(),
        json.dumps({"event": "call_ended", "call": ended}).encode(),
        json.dumps({"event": "call_analyzed", "call": call}).encode(),
    ]
    return Call(cid, bodies, bodies[:1], call)


RETELL = VendorCase(
    name="retell",
    key=RETELL_KEY,
    api=retell_api,
    call=retell,
    list_path="/v3/list-calls",
    get_path=lambda cid: f"/v2/get-call/{cid}",
    keyed_event="call_analyzed",
    webhook_settings={"webhooks.retell.api_key": RETELL_KEY},
    sign=retell_headers,
)


# --- ElevenLabs: the docs' post-call transcription example, one per conversation -------------------------

_ELEVENLABS = json.loads((FIXTURES / "elevenlabs" / "post_call_transcription.json").read_text())


def elevenlabs_headers(body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    mac = hmac.new(ELEVENLABS_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"elevenlabs-signature": f"t={stamp},v0={mac}"}


def elevenlabs(i: int, created: float) -> Call:
    cid = f"el-conv-{i:03d}"
    webhook = copy.deepcopy(_ELEVENLABS)
    data = webhook["data"]
    data["conversation_id"] = cid
    data["metadata"]["start_time_unix_secs"] = int(created)
    webhook["event_timestamp"] = int(created) + 90
    for turn in data["transcript"]:
        if turn["role"] == "agent" and turn.get("message"):
            turn["message"] = f"{turn['message']} ({i})"
    # The API's model is the webhook's data, and a few fields the webhook leaves out.
    record = {**data, "has_audio": True, "has_user_audio": True, "has_response_audio": True}
    return Call(cid, [json.dumps(webhook).encode()], [], record)


ELEVENLABS = VendorCase(
    name="elevenlabs",
    key=ELEVENLABS_KEY,
    api=elevenlabs_api,
    call=elevenlabs,
    list_path="/v1/convai/conversations",
    get_path=lambda cid: f"/v1/convai/conversations/{cid}",
    keyed_event="",  # its key holds the webhook's event_timestamp, which the API does not give
    webhook_settings={"webhooks.elevenlabs.signing_secret": ELEVENLABS_SECRET},
    sign=elevenlabs_headers,
)


CASES: list[VendorCase] = [VAPI, RETELL, ELEVENLABS]
