"""GET /metrics after a scripted run: every figure moves as the run says it should."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AppClient
from tests.payloads import encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_a_scripted_run(app_client: AppClient) -> None:
    transcript = encode(transcription_ready("m-1", turns=9))  # 10 messages with the system entry
    async with app_client() as client:
        before = samples((await client.get("/metrics")).text)
        for _ in range(2):  # the second time: a duplicate delivery
            assert (await client.post("/webhooks/tavus", content=transcript)).status_code == 200
        await client.post("/webhooks/tavus", content=encode(transcription_ready("m-2", turns=4)))
        await client.post("/webhooks/tavus", content=encode(envelope("m-1", "system.shutdown", {})))
        await client.post("/webhooks/tavus", content=encode(envelope("m-3", "vendor.new_thing", {})))
        await client.post("/webhooks/tavus", content=b"{nope")
        bad_entry = transcription_ready("m-4", turns=2)
        bad_entry["properties"]["transcript"][1] = {"role": 5}
        assert (await client.post("/webhooks/tavus", content=encode(bad_entry))).status_code == 422
        for _ in range(3):
            await client.get("/conversations/m-1/messages")  # one miss, then hits
        recording = envelope("m-1", "application.recording_ready", {"storage_uri": "s3://b/k"})
        await client.post("/webhooks/tavus", content=encode(recording))  # evicts m-1's cached reads
        after = samples((await client.get("/metrics")).text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ready = "application.transcription_ready"
    assert moved("transcriptd_deliveries_total", event_type=ready, outcome="stored") == 2
    assert moved("transcriptd_deliveries_total", event_type=ready, outcome="duplicate") == 1
    assert moved("transcriptd_deliveries_total", event_type=ready, outcome="partial") == 1
    assert moved("transcriptd_deliveries_total", event_type="system.shutdown", outcome="stored") == 1
    assert moved("transcriptd_deliveries_total", event_type="other", outcome="stored") == 1
    assert moved("transcriptd_dedup_hits_total") == 1
    assert moved("transcriptd_messages_total", outcome="inserted") == 10 + 5 + 2
    assert moved("transcriptd_messages_total", outcome="duplicate") == 10
    assert moved("transcriptd_messages_total", outcome="rejected") == 1
    assert moved("transcriptd_rejected_requests_total", reason="malformed_json") == 1
    assert moved("transcriptd_rejected_requests_total", reason="invalid_payload") == 1
    assert moved("transcriptd_ack_latency_seconds_count", ack="durable") == 7
    assert moved("transcriptd_commit_duration_seconds_count") >= 1
    assert moved("transcriptd_commit_rows_sum") == 10 + 5 + 2
    assert moved("transcriptd_cache_misses_total") >= 1
    assert moved("transcriptd_cache_hits_total") >= 2
    assert moved("transcriptd_cache_evictions_total") >= 2  # m-1's record and page
    assert value(after, "transcriptd_live_actors") == 0  # every delivery settled: no actor is left
    assert value(after, "transcriptd_mailbox_depth") == 0
    assert value(after, "transcriptd_oldest_pending_delivery_age_seconds") == 0
    assert value(after, "transcriptd_inflight_bytes") == 0


async def test_metric_names_follow_prometheus_conventions(app_client: AppClient) -> None:
    async with app_client() as client:
        await client.post("/webhooks/tavus", content=encode(transcription_ready("m-names", turns=1)))
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    ours = [f for f in families if f.name.startswith("transcriptd_")]
    assert len(ours) >= 12
    assert not [f.name for f in families if not f.name.startswith(("transcriptd_", "python_", "process_"))]
    for family in ours:
        for sample in family.samples:
            assert "conversation_id" not in sample.labels, "no per-conversation labels: series must stay bounded"
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_rows")), family.name
