"""Property-based tests of POST /webhooks/retell through the real app, every body signed by Retell's SDK.

Properties: any transcript reads back through the read API in order, role by role and byte for byte;
whatever a signed body holds, never a 500 and every error in the one shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.app import create_app
from daemon.sources.retell import ROLES, SIGNATURE_HEADER
from tests.conftest import Storage
from tests.retell_signing import sign
from tests.test_fuzz import (
    Client,
    broken_json,
    check_answer,
    decoded,
    fresh_id,
    fuzz,
    json_values,
    running,
    text_content,
)

API_KEY = "key_retell-e2e-5a7c"  # in TEST_SECRETS
EVENTS = ["call_started", "call_ended", "call_analyzed", "transcript_updated", "transfer_started"]


@pytest.fixture
def client(storage: Storage) -> Iterator[Client]:
    config = storage.config(**{"webhooks.retell.api_key": API_KEY})
    with running(create_app(config)) as client:
        yield client


def signed_post(client: Client, body: bytes) -> Any:
    return client.post("/webhooks/retell", content=body, headers={SIGNATURE_HEADER: sign(body, API_KEY)})


words = st.lists(
    st.fixed_dictionaries(
        {"word": st.text(max_size=10)},
        optional={"start": st.floats(0, 7200), "end": st.floats(0, 7200)},
    ),
    max_size=4,
)
spoken = st.fixed_dictionaries(
    {"role": st.sampled_from(["agent", "user", "transfer_target"]), "content": text_content, "words": words}
)
tool_calls = st.fixed_dictionaries(
    {
        "role": st.just("tool_call_invocation"),
        "tool_call_id": st.text(max_size=20),
        "name": st.text(max_size=20),
        "arguments": st.builds(json.dumps, json_values),
    }
)
tool_results = st.fixed_dictionaries(
    {"role": st.just("tool_call_result"), "tool_call_id": st.text(max_size=20), "content": text_content},
    optional={"successful": st.booleans()},
)
entries = st.lists(st.one_of(spoken, tool_calls, tool_results), max_size=12)


def test_any_transcript_reads_back_exactly(client: Client, storage: Storage) -> None:
    @fuzz(80)
    @given(transcript=entries, key=st.sampled_from(["transcript_object", "transcript_with_tool_calls"]))
    def round_trip(transcript: list[dict[str, Any]], key: str) -> None:
        cid = fresh_id("rt-retell")
        body = json.dumps({"event": "call_ended", "call": {"call_id": cid, key: transcript}}).encode()
        response = signed_post(client, body)
        if storage.refused(response, transcript):
            return
        check_answer(response)
        assert response.status_code == 200, response.text
        assert response.json()["received"] == len(transcript)
        read = client.get(f"/conversations/{cid}/messages", params={"include_system": "true", "limit": "500"})
        assert read.status_code == 200, read.text
        stored = read.json()["messages"]
        assert [m["seq"] for m in stored] == list(range(len(transcript)))
        for entry, message in zip(transcript, stored, strict=True):
            vendor_role = entry["role"]
            assert message["role"] == ROLES[vendor_role]
            assert message.get("vendor_role", message["role"]) == vendor_role
            if message["role"] == "tool":
                assert json.loads(message["content"]) == {k: v for k, v in entry.items() if k != "role"}
            else:
                assert message["content"] == entry["content"]

    round_trip()


MAPPED = ("call_status", "start_timestamp", "end_timestamp", "disconnection_reason", "recording_url", "call_analysis")
transcripts = st.lists(st.one_of(spoken, tool_calls, json_values), max_size=4) | json_values
call_objects = st.fixed_dictionaries(
    {"call_id": st.text(min_size=1, max_size=40)},
    optional=dict.fromkeys(MAPPED, json_values)
    | dict.fromkeys(("transcript_object", "transcript_with_tool_calls"), transcripts),
)


def utf8(body: bytes) -> bool:
    """Retell signs text: a body that is not UTF-8 cannot carry its signature (test_retell_webhook covers it)."""
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


odd_bodies = st.one_of(
    st.builds(
        lambda event, call: json.dumps({"event": event, "call": call}).encode(), st.sampled_from(EVENTS), call_objects
    ),
    st.builds(
        lambda event, call: json.dumps({"event": event, "data": call}).encode(), st.text(max_size=40), json_values
    ),
    st.dictionaries(st.sampled_from(["event", "call", "data", "chat"]), json_values).map(
        lambda d: json.dumps(d).encode()
    ),
    broken_json.filter(utf8),
)


def test_whatever_a_signed_body_holds_the_server_answers_in_shape(client: Client, storage: Storage) -> None:
    @fuzz(250)
    @given(body=odd_bodies)
    def post(body: bytes) -> None:
        response = signed_post(client, body)
        if storage.refused(response, decoded(body)):
            return
        check_answer(response)
        assert response.status_code in (200, 400, 422), response.text

    post()
