"""Property-based requests generated from our own /openapi.json, against the real app in-process.

Schemathesis starts the app's lifespan on its first request and ends it after each test (its pytest plugin).
The schema is loaded at import: ``schemathesis.pytest.from_fixture`` fails under pytest 9 (it reads the
removed ``Node._nodeid``), so the app's database lives in a directory of its own, removed at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, Response
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from daemon.app import create_app
from tests.conftest import make_config
from tests.contract import check_answer

_DB_DIR = tempfile.TemporaryDirectory(prefix="transcriptd-schemathesis-")
# Configured as an operator runs it: a source that requires a secret (ElevenLabs, Retell) answers 503 without one.
_CONFIG = make_config(
    Path(_DB_DIR.name) / "transcriptd.db",
    **{
        "webhooks.elevenlabs.signing_secret": "wsec_transcriptd-test-elevenlabs-1",
        "webhooks.retell.api_key": "key_retell-e2e-5a7c",
        # A long-poll of the change feed with nothing to wait for ends this soon, whatever `wait` it asks.
        "changes.max_wait_s": 0.05,
    },
)
# The change stream never ends by itself (it ends when its client goes, or the server stops): not callable
# in-process to the end. tests/test_change_stream.py runs it against a real daemon.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_CONFIG)).exclude(path="/changes/stream")


@pytest.fixture(scope="module", autouse=True)
def _remove_the_database() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()  # the writer closes the database before its directory goes
    _DB_DIR.cleanup()


def header(response: Response, name: str) -> str | None:
    values = response.headers.get(name)  # every header, as the list of its values
    return values[0] if values else None


def check_error_shape(response: Response) -> None:
    check_answer(response.status_code, lambda name: header(response, name), response.json, response.text)


# What the schema cannot say, so schema-valid requests that are rightly refused with a 422 on this field:
# a cursor is opaque (only the API's own are valid), `page` and `after` exclude each other, and a pattern
# cannot say which dates exist (`updated_since=2024-13-45`).
UNEXPRESSED = {"query.cursor", "query.after", "query.updated_since"}


def check_positive_data_accepted(case: Case[Any], response: Response) -> None:
    """schemathesis' positive_data_acceptance, but knowing the constraints the schema cannot state."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return
    field = response.json()["error"]["field"]
    assert field in UNEXPRESSED, f"a schema-valid request was refused: {response.text}"


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_in_the_schema(case: Case[Any]) -> None:
    response = case.call()
    check_error_shape(response)
    check_positive_data_accepted(case, response)
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],  # replaced by check_positive_data_accepted
    )
