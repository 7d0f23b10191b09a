"""Who may scrape /metrics: api.token or api.metrics_token, when either is set; the probes stay open."""

from __future__ import annotations

import pytest

from tests.conftest import AppClient

API_TOKEN = "read-s3cret"
METRICS_TOKEN = "metr1cs-s3cret"
TAVUS_TOKEN = "t0ken-Secret-1234"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.anyio
async def test_metrics_take_the_api_token_or_the_metrics_token_and_nothing_else(app_client: AppClient) -> None:
    async with app_client(**{"api.token": API_TOKEN, "api.metrics_token": METRICS_TOKEN}) as client:
        for headers in ({}, bearer("wrong"), {"Authorization": METRICS_TOKEN}, {"Authorization": f"Basic {API_TOKEN}"}):
            refused = await client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "unauthorized"
        for token in (API_TOKEN, METRICS_TOKEN):
            scraped = await client.get("/metrics", headers=bearer(token))
            assert scraped.status_code == 200
            assert "transcriptd_deliveries" in scraped.text
        # The metrics token opens /metrics only: not a read, not the generic write.
        assert (await client.get("/conversations", headers=bearer(METRICS_TOKEN))).status_code == 401
        written = await client.post(
            "/conversations/c-m/messages", json={"role": "user", "content": "hi"}, headers=bearer(METRICS_TOKEN)
        )
        assert written.status_code == 401
        assert (await client.get("/conversations", headers=bearer(API_TOKEN))).status_code == 200


@pytest.mark.anyio
async def test_a_metrics_token_alone_guards_metrics(app_client: AppClient) -> None:
    async with app_client(**{"api.metrics_token": METRICS_TOKEN}) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer(METRICS_TOKEN))).status_code == 200


@pytest.mark.anyio
async def test_the_probes_stay_open_and_readyz_says_nothing_secret(app_client: AppClient) -> None:
    settings = {"api.token": API_TOKEN, "api.metrics_token": METRICS_TOKEN, "webhooks.tavus.token": TAVUS_TOKEN}
    async with app_client(**settings) as client:
        assert (await client.get("/livez")).status_code == 200
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()) <= {
        "status",
        "writer",
        "intake",
        "live_actors",
        "queued_deliveries",
        "storage_error",
        "leader",
    }
    for secret in settings.values():
        assert secret not in ready.text
    assert "transcriptd.db" not in ready.text  # not even where the database is
