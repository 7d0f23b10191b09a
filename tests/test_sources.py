"""The source registry: every registered source has every part, and everything that differs per source
(routes, OpenAPI, replay, metrics labels, the read API's ``?source=``, settings, secrets, log masking, the
README) reads the registry. A source added without one of its parts fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.routing import Route

from daemon.api import MessagesQuery
from daemon.cli import replay_parsers
from daemon.config import Config, env_name, load_config, secret_paths, setting_paths
from daemon.errors import request_source
from daemon.logs import REDACTED, RedactSecrets, config_secrets
from daemon.metrics import KNOWN_EVENT_TYPES
from daemon.openapi import build_spec
from daemon.routes import ROUTES
from daemon.sources import BY_NAME, EVENT_TYPES, NAMES, SOURCES, WEBHOOK_SOURCES
from daemon.sources.model import Source, WebhookSettings, is_secret
from tests.conftest import AppClient

REPO = Path(__file__).resolve().parent.parent
IDS = [source.name for source in SOURCES]


def test_the_registry_lists_the_sources_once_each() -> None:
    assert len(NAMES) == len(SOURCES) == len(set(NAMES))
    assert {"tavus", "api"} <= set(NAMES)
    assert BY_NAME["tavus"].settings is not None
    assert frozenset().union(*(s.events for s in SOURCES)) == EVENT_TYPES


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_each_source_declares_every_part(source: Source[Any]) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9]*", source.name), "a name fits a path segment, a setting and an env var"
    assert source.title
    assert callable(source.parse)
    assert callable(source.replay)
    assert source.events, "no event types: metrics would label every delivery 'other'"
    assert all(isinstance(event, str) and event for event in source.events)
    assert source.body is not None, "no request body type for OpenAPI"
    msgspec.json.schema(source.body)  # the body type describes itself
    if source.settings is None:
        assert source.bearer, "a source without settings is guarded by api.token"
        assert source.path, "a source without settings has a path of its own"
    else:
        assert issubclass(source.settings, WebhookSettings)
        assert source.authenticate is not None, "a webhook source says how it authenticates (even: nothing more)"
        assert source.path is None, "a webhook source is served at /webhooks/<name>"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_each_source_is_routed_and_described(source: Source[Any]) -> None:
    routed = {route.path: route.methods or set() for route in ROUTES if isinstance(route, Route)}
    spec = build_spec()
    for path in source.paths:
        assert "POST" in routed[path]
        operation = spec["paths"][path]["post"]
        assert operation["operationId"].startswith(source.operation_id)
        assert "requestBody" in operation
        assert {"200", "202", "401", "422", "503"} <= set(operation["responses"])
    if source.path is None:
        assert source.paths == (f"/webhooks/{source.name}", f"/webhooks/{source.name}/{{token}}")


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_each_source_is_replayed_labelled_and_readable(source: Source[Any]) -> None:
    assert replay_parsers()[source.name] is source.replay
    assert source.events <= KNOWN_EVENT_TYPES
    assert msgspec.convert({"source": source.name}, MessagesQuery).source == source.name
    parameters = build_spec()["paths"]["/conversations/{conversation_id}/messages"]["get"]["parameters"]
    (source_parameter,) = [p for p in parameters if p["name"] == "source"]
    assert source.name in str(source_parameter["schema"])


def test_the_read_api_refuses_a_source_that_is_not_registered() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"source": "nosuchsource"}, MessagesQuery)


@pytest.mark.parametrize("source", WEBHOOK_SOURCES, ids=[s.name for s in WEBHOOK_SOURCES])
def test_each_webhook_source_has_its_settings_secrets_env_vars_and_readme_section(source: Source[Any]) -> None:
    assert source.settings is not None
    paths = [path for path in setting_paths() if path[:2] == ("webhooks", source.name)]
    fields = {field.name: field for field in msgspec.structs.fields(source.settings)}
    assert {path[2] for path in paths} == set(fields)
    assert isinstance(getattr(Config().webhooks, source.name), source.settings)
    # Every setting has its environment variable, and every secret is marked, masked and never echoed.
    secrets = [name for name, field in fields.items() if is_secret(field.type)]
    assert "token" in secrets
    for name in secrets:
        assert ("webhooks", source.name, name) in set(secret_paths())
    known = {env_name(path) for path in setting_paths()}
    assert {env_name(path) for path in paths} <= known
    # The path token is free text, so it can be set from its variable here; a secret of another form (a
    # whsec_ key) is masked the same way, as a marked setting (test_logs covers those values).
    token = f"value-of-{source.name}-token-x9"
    config = load_config(Path("/dev/null"), environ={env_name(("webhooks", source.name, "token")): token})
    assert getattr(config.webhooks, source.name).token == token
    assert token in config_secrets(config)
    headings = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines() if line[:1] == "#"]
    assert any(f"`POST /webhooks/{source.name}`" in line for line in headings), f"no README section on {source.name}"


@pytest.mark.parametrize("source", WEBHOOK_SOURCES, ids=[s.name for s in WEBHOOK_SOURCES])
def test_each_webhook_path_token_is_masked_in_logs(source: Source[Any]) -> None:
    mask = RedactSecrets([])
    line = f'"POST /webhooks/{source.name}/an-old-token-123 HTTP/1.1" 401'
    assert mask.redact(line) == f'"POST /webhooks/{source.name}/{REDACTED} HTTP/1.1" 401'
    escaped = f'{{"url": "https:\\/\\/x.example\\/webhooks\\/{source.name}\\/tok-456"}}'
    assert "tok-456" not in mask.redact(escaped)
    # The rejection log names the source, never the path (it holds the token).
    assert request_source(f"/webhooks/{source.name}/tok-789") == source.name
    assert request_source(f"/webhooks/{source.name}") == source.name


@pytest.mark.anyio
@pytest.mark.parametrize("source", WEBHOOK_SOURCES, ids=[s.name for s in WEBHOOK_SOURCES])
async def test_each_webhook_source_checks_its_path_token(app_client: AppClient, source: Source[Any]) -> None:
    token = f"path-token-{source.name}-7q"
    async with app_client(**{f"webhooks.{source.name}.token": token}) as client:
        bare = await client.post(f"/webhooks/{source.name}", content=b"{}")
        wrong = await client.post(f"/webhooks/{source.name}/not-it", content=b"{}")
        right = await client.post(f"/webhooks/{source.name}/{token}", content=b"not json")
    assert bare.status_code == wrong.status_code == 401
    assert "token" in bare.json()["error"]["message"]
    # Past the token, the source's own checks (a signature, if configured) or its parser answer.
    assert right.status_code != 401 or "token" not in right.json()["error"]["message"]
    async with app_client() as client:
        stray = await client.post(f"/webhooks/{source.name}/unexpected", content=b"{}")
    assert stray.status_code == 401
    assert f"/webhooks/{source.name}" in stray.json()["error"]["message"]
