"""Every documented Tavus callback, through the real app and a real SQLite file."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.conftest import AppClient
from tests.payloads import SYSTEM_PROMPT, encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

Query = Any


async def test_transcript_with_epoch_timestamps_is_stored_in_order(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-epoch", turns=100, timestamps="epoch")
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.status_code == 200
    assert response.json() == {
        "status": "stored",
        "received": 101,
        "inserted": 101,
        "updated": 0,
        "duplicates": 0,
        "rejected": 0,
        "duplicate": False,
    }
    rows = db("SELECT seq, role, content, timestamp FROM messages WHERE conversation_id = ? ORDER BY seq", ("c-epoch",))
    sent = body["properties"]["transcript"]
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, e["role"], e["content"]) for i, e in enumerate(sent)]
    assert rows[0][2] == SYSTEM_PROMPT
    assert len(rows[0][2]) > 4000
    assert rows[1][3] == 1740824130.0
    (count, last, status, replica) = db(
        "SELECT message_count, last_message_at, status, replica_id FROM conversations WHERE id = 'c-epoch'"
    )[0]
    assert (count, status, replica) == (101, "ended", "r79e1c033f")
    assert last == 1740824130.0 + 99 * 2.5


async def test_iso_timestamps_become_unix_seconds(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-iso", turns=3, timestamps="iso")
    body["properties"]["transcript"][1]["timestamp"] = "2025-03-01T10:15:00Z"
    body["properties"]["transcript"][2]["timestamp"] = "2025-03-01T12:15:00+02:00"
    body["properties"]["transcript"][3]["timestamp"] = "not a time"
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(body))).status_code == 200
    stamps = db("SELECT timestamp FROM messages WHERE conversation_id = 'c-iso' ORDER BY seq")
    # Both forms name the same instant; an unreadable one is dropped, the message kept.
    assert [s[0] for s in stamps] == [None, 1740824100.0, 1740824100.0, None]


async def test_empty_content_and_optional_fields(app_client: AppClient, db: Query) -> None:
    entries: list[dict[str, Any]] = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "", "seconds_from_start": 1.5, "duration": "0.75", "inference_id": "i-1"},
        {"role": "tool"},
        {"role": "assistant", "content": "ok", "timestamp": None},
    ]
    body = envelope("c-empty", "application.transcription_ready", {"transcript": entries})
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.status_code == 200, response.text
    rows = db(
        "SELECT seq, role, content, seconds_from_start, duration, inference_id FROM messages "
        "WHERE conversation_id = 'c-empty' ORDER BY seq"
    )
    assert rows == [
        (0, "system", "", None, None, None),
        (1, "user", "", 1.5, 0.75, "i-1"),
        (2, "tool", "", None, None, None),
        (3, "assistant", "ok", None, None, None),
    ]


async def test_a_thousand_entry_transcript(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-long", turns=999)
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.json()["inserted"] == 1000
    assert db("SELECT count(*), min(seq), max(seq) FROM messages WHERE conversation_id = 'c-long'") == [(1000, 0, 999)]


async def test_the_same_transcript_twice_stores_one_copy(app_client: AppClient, db: Query) -> None:
    body = encode(transcription_ready("c-dup", turns=20))
    async with app_client() as client:
        first = (await client.post("/webhooks/tavus", content=body)).json()
        second = (await client.post("/webhooks/tavus", content=body)).json()
    assert (first["inserted"], first["duplicates"]) == (21, 0)
    assert (second["inserted"], second["duplicates"]) == (0, 21)
    assert db("SELECT count(*) FROM messages WHERE conversation_id = 'c-dup'") == [(21,)]
    assert db("SELECT count(*) FROM events WHERE conversation_id = 'c-dup'") == [(1,)]


async def test_a_changed_entry_at_an_existing_position_is_updated(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-edit", turns=10)
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(body))
        body["properties"]["transcript"][4]["content"] = "corrected"
        body["properties"]["transcript"].append({"role": "user", "content": "one more"})
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.json() == {
        "status": "stored",
        "received": 12,
        "inserted": 1,
        "updated": 1,
        "duplicates": 10,
        "rejected": 0,
        "duplicate": False,
    }
    assert db("SELECT content FROM messages WHERE conversation_id = 'c-edit' AND seq = 4") == [("corrected",)]
    assert db("SELECT count(*), max(seq) FROM messages WHERE conversation_id = 'c-edit'") == [(12, 11)]
    assert db("SELECT message_count FROM conversations WHERE id = 'c-edit'") == [(12,)]


async def test_replica_joined_and_pal_joined_are_one_event(app_client: AppClient, db: Query) -> None:
    async with app_client() as client:
        for name in ("system.replica_joined", "system.pal_joined"):
            props = {"replica_id": "r-1"}
            response = await client.post("/webhooks/tavus", content=encode(envelope("c-join", name, props)))
            assert response.status_code == 200
    assert db("SELECT count(*) FROM events WHERE conversation_id = 'c-join'") == [(1,)]
    assert db("SELECT status, replica_id, started_at FROM conversations WHERE id = 'c-join'") == [
        ("active", "r-1", 1740824130.123456)
    ]


async def test_shutdown_ends_the_conversation_even_before_it_joined(app_client: AppClient, db: Query) -> None:
    shutdown = envelope(
        "c-end", "system.shutdown", {"replica_id": "r-2", "shutdown_reason": "participant_left_timeout"}
    )
    joined = envelope("c-end", "system.replica_joined", {"replica_id": "r-2"}, timestamp=1740824000)
    async with app_client() as client:
        # Arrival order is not guaranteed: the join comes second here, and must not re-open the call.
        assert (await client.post("/webhooks/tavus", content=encode(shutdown))).status_code == 200
        assert (await client.post("/webhooks/tavus", content=encode(joined))).status_code == 200
    assert db("SELECT status, shutdown_reason, started_at, ended_at FROM conversations WHERE id = 'c-end'") == [
        ("ended", "participant_left_timeout", 1740824000.0, 1740824130.123456)
    ]


@pytest.mark.parametrize(
    ("properties", "uri", "provider", "duration"),
    [
        ({"bucket_name": "tavus-rec", "s3_key": "c/rec.mp4", "duration": 312}, "s3://tavus-rec/c/rec.mp4", "s3", 312.0),
        ({"storage_provider": "gcs", "storage_uri": "gs://b/rec.mp4"}, "gs://b/rec.mp4", "gcs", None),
    ],
)
async def test_recording_ready_old_and_new_shapes(
    app_client: AppClient, db: Query, properties: dict[str, Any], uri: str, provider: str, duration: float | None
) -> None:
    body = envelope("c-rec", "application.recording_ready", properties)
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(body))).status_code == 200
    assert db("SELECT recording_uri, recording_provider, recording_duration FROM conversations") == [
        (uri, provider, duration)
    ]


async def test_analysis_unavailable_copy_failure_and_post_call_action(app_client: AppClient, db: Query) -> None:
    analysis = "## Summary\n\n" + "- the user smiled\n" * 500
    bodies = [
        envelope("c-an", "application.perception_analysis", {"analysis": analysis}),
        envelope("c-an", "application.perception_unavailable", {"reason": "no video"}),
        envelope("c-an", "application.recording_copy_failed", {"error_message": "AccessDenied"}),
        envelope(
            "c-an",
            "application.post_call_action_executed",
            {"tool_name": "crm", "status": "ok", "request": {"a": 1}, "response": "done"},
        ),
    ]
    async with app_client() as client:
        for body in bodies:
            response = await client.post("/webhooks/tavus", content=encode(body))
            assert response.status_code == 200, response.text
    assert db(
        "SELECT perception_analysis, perception_unavailable_reason, recording_error"
        " FROM conversations WHERE id = 'c-an'"
    ) == [(analysis, "no video", "AccessDenied")]
    types = db("SELECT event_type FROM events WHERE conversation_id = 'c-an' ORDER BY id")
    assert [t[0] for t in types] == [b["event_type"] for b in bodies]


async def test_an_unknown_event_type_is_stored_raw_and_answered_2xx(app_client: AppClient, db: Query) -> None:
    raw = b'{"event_type": "application.brand_new", "conversation_id": "c-new", "properties": {"x": [1, 2]}}'
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=raw)
    assert response.status_code == 200
    assert db("SELECT source, event_type, body FROM events") == [("tavus", "application.brand_new", raw)]


async def test_key_order_does_not_matter(app_client: AppClient, db: Query) -> None:
    raw = (
        b'{"timestamp": 1740824130, "message_type": "application", "event_type": "application.transcription_ready",'
        b' "conversation_id": "c-order", "properties": {"transcript": [{"content": "hi", "role": "user"}]}}'
    )
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=raw)).status_code == 200
    assert db("SELECT role, content FROM messages") == [("user", "hi")]


async def test_bad_entries_are_named_and_every_good_one_is_stored(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-bad", turns=10)
    body["properties"]["transcript"][3] = {"role": 7, "content": "x"}
    body["properties"]["transcript"][6] = {"content": "no role"}
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.status_code == 422
    error = response.json()["error"]
    assert [p["field"] for p in error["problems"]] == [
        "$.properties.transcript[3].role",
        "$.properties.transcript[6]",
    ]
    assert "role" in error["problems"][1]["message"]
    assert response.json()["accepted"]["inserted"] == 9
    assert response.json()["accepted"]["rejected"] == 2
    seqs = [r[0] for r in db("SELECT seq FROM messages WHERE conversation_id = 'c-bad' ORDER BY seq")]
    assert seqs == [0, 1, 2, 4, 5, 7, 8, 9, 10]
    # The raw body is kept, so the two entries can be re-derived once their shape is understood.
    assert db("SELECT count(*) FROM events WHERE conversation_id = 'c-bad'") == [(1,)]


async def test_wrong_properties_keep_the_raw_event_and_name_the_field(app_client: AppClient, db: Query) -> None:
    body = envelope("c-props", "application.recording_ready", {"duration": "long"})
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "$.properties.duration"
    assert db("SELECT event_type FROM events") == [("application.recording_ready",)]


async def test_a_bad_replica_id_costs_no_message(app_client: AppClient, db: Query) -> None:
    body = transcription_ready("c-rid", turns=2)
    body["properties"]["replica_id"] = 42
    async with app_client() as client:
        response = await client.post("/webhooks/tavus", content=encode(body))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "$.properties.replica_id"
    assert response.json()["accepted"]["inserted"] == 3
    assert db("SELECT count(*) FROM messages") == [(3,)]


async def test_a_malformed_join_does_not_shadow_the_good_one(app_client: AppClient, db: Query) -> None:
    bad = envelope("c-j", "system.pal_joined", {"replica_id": ["not", "a", "string"]})
    good = envelope("c-j", "system.replica_joined", {"replica_id": "r-9"})
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(bad))).status_code == 422
        answer = await client.post("/webhooks/tavus", content=encode(good))
    assert answer.status_code == 200
    assert db("SELECT replica_id, started_at IS NOT NULL FROM conversations") == [("r-9", 1)]


@pytest.mark.parametrize("together", [False, True], ids=["apart", "one-batch"])
async def test_live_messages_and_the_final_transcript_are_two_streams(
    app_client: AppClient, db: Query, together: bool
) -> None:
    """An app forwards utterances live, then Tavus sends the transcript of the same call: neither may
    overwrite or reorder the other, whether they are committed apart or in one batch."""
    live = [{"role": "user", "content": "live hello", "id": "u1"}, {"role": "assistant", "content": "live hi"}]
    transcript = encode(transcription_ready("c-both", turns=2))
    settings = {"ingest.batch_max_delay_ms": 200.0} if together else {}
    async with app_client(**settings) as client:
        if together:

            async def post_live() -> None:
                await client.post("/conversations/c-both/messages", json=live)

            async def post_transcript() -> None:
                await client.post("/webhooks/tavus", content=transcript)

            async with anyio.create_task_group() as tg:
                tg.start_soon(post_live)
                tg.start_soon(post_transcript)
        else:
            await client.post("/conversations/c-both/messages", json=live)
            await client.post("/webhooks/tavus", content=transcript)
    rows = db("SELECT source, seq, content FROM messages WHERE conversation_id = 'c-both' ORDER BY source, seq")
    assert [r[:2] for r in rows] == [("api", 0), ("api", 1), ("tavus", 0), ("tavus", 1), ("tavus", 2)]
    assert [r[2] for r in rows[:2]] == ["live hello", "live hi"]
    assert db("SELECT message_count FROM conversations WHERE id = 'c-both'") == [(5,)]


@pytest.mark.parametrize("timestamps", ["epoch", "iso"])
def test_a_transcript_decoded_in_one_pass_or_two_gives_the_same_delivery(timestamps: str) -> None:
    import json
    import math

    from daemon.sources import tavus

    body = transcription_ready("c-pass", turns=30, timestamps=timestamps)
    one_pass = encode(body)
    # The event type buried mid-body (a key order Tavus does not use): only the general path finds it.
    rest = {key: value for key, value in body.items() if key != "event_type"}
    reordered = {"a": "x" * 1024, "event_type": body["event_type"], **rest, "z": "x" * 1024}
    two_passes = json.dumps(reordered).encode()
    assert tavus._transcription_ready(one_pass) is not None
    assert tavus._transcription_ready(two_passes) is None
    fast, fast_problems = tavus.parse(one_pass, {}, received_at=1.0)
    slow, slow_problems = tavus.parse(two_passes, {}, received_at=1.0)
    assert fast_problems == slow_problems == []
    assert fast.patch == slow.patch
    assert fast.last_message_at == slow.last_message_at

    def same(a: object, b: object) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    assert len(fast.rows) == len(slow.rows) == 31
    assert all(same(a, b) for fr, sr in zip(fast.rows, slow.rows, strict=True) for a, b in zip(fr, sr, strict=True))


@pytest.mark.parametrize("first", ["", "x" * 129])
def test_a_transcript_with_a_bad_event_type_before_the_good_one_is_refused_by_either_path(first: str) -> None:
    from daemon.errors import InvalidPayload
    from daemon.sources import tavus

    entries = '[{"role": "user", "content": "hi"}]'
    body = (
        f'{{"conversation_id": "c", "event_type": "{first}", "properties": {{"transcript": {entries}}},'
        ' "event_type": "application.transcription_ready"}'
    ).encode()
    with pytest.raises(InvalidPayload):
        tavus.parse(body, {}, received_at=1.0)
