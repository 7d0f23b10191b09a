"""Vapi authentication: the shared secret (X-Vapi-Secret, Authorization: Bearer, or a named header) and the
configurable HMAC, against transcriptd's own vectors (Vapi publishes none; each was computed with openssl, see
tests/fixtures/README.md) and every rejection: missing and malformed headers, boundary timestamps, a
signature over another body, another secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.config import ConfigError, load_config
from daemon.errors import Unauthorized
from daemon.sources.model import Verify
from daemon.sources.vapi_auth import VapiSettings, authenticate

FIXTURES = Path(__file__).parent / "fixtures" / "vapi"
VECTORS: list[dict[str, Any]] = json.loads((FIXTURES / "hmac-vectors.json").read_text())["vectors"]
SECRET = "vapi-test-hmac-secret"
NOW = 1_760_000_000
BODY = (FIXTURES / "events-end-of-call-report.json").read_bytes()


def verifier(now: float = NOW, **settings: Any) -> Verify:
    verify = authenticate(msgspec.convert(settings, VapiSettings), clock=lambda: now)
    assert verify is not None
    return verify


def sign(body: bytes, timestamp: str, *, secret: str = SECRET) -> str:
    """Vapi's documented default, written out here: hex HMAC-SHA256 of "{timestamp}.{body}"."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def refused(verify: Verify, headers: Mapping[str, str], body: bytes = BODY) -> str:
    with pytest.raises(Unauthorized) as raised:
        verify(body, headers)
    assert raised.value.status == 401
    return raised.value.message


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_each_vector_verifies(vector: dict[str, Any]) -> None:
    body = (FIXTURES / vector["body_file"]).read_bytes()
    verify = verifier(vector["now"], hmac_secret=vector["secret"], **vector["settings"])
    verify(body, vector["headers"])
    # The same headers over another body, or with another secret, are refused.
    refused(verify, vector["headers"], body + b" ")
    other = verifier(vector["now"], hmac_secret=base64.b64encode(b"another key").decode(), **vector["settings"])
    assert "does not match" in refused(other, vector["headers"], body)


def test_the_default_vector_is_what_the_documented_scheme_gives() -> None:
    (default,) = [v for v in VECTORS if not v["settings"] and len(v["headers"]["x-timestamp"]) == 10]
    assert default["headers"]["x-signature"] == sign(BODY, default["headers"]["x-timestamp"])


@pytest.mark.parametrize(
    ("headers", "check"),
    [
        ({}, "missing x-signature header"),
        ({"x-signature": "   "}, "missing x-signature header"),
        ({"x-signature": sign(BODY, str(NOW))}, "missing x-timestamp header"),
        ({"x-signature": sign(BODY, "12a"), "x-timestamp": "12a"}, "malformed x-timestamp"),
        ({"x-signature": sign(BODY, "-5"), "x-timestamp": "-5"}, "malformed x-timestamp"),
        ({"x-signature": "00", "x-timestamp": "9" * 400}, "malformed x-timestamp"),
        ({"x-signature": "zz", "x-timestamp": str(NOW)}, "not hex"),
        ({"x-signature": "abc", "x-timestamp": str(NOW)}, "not hex"),
        ({"x-signature": "00" * 32, "x-timestamp": str(NOW)}, "does not match"),
        ({"x-signature": sign(BODY, str(NOW))[:-2], "x-timestamp": str(NOW)}, "does not match"),
        ({"x-signature": sign(BODY + b"x", str(NOW)), "x-timestamp": str(NOW)}, "does not match"),
        ({"x-signature": sign(BODY, str(NOW), secret="other"), "x-timestamp": str(NOW)}, "does not match"),
        ({"x-signature": sign(BODY, str(NOW)), "x-timestamp": str(NOW + 1)}, "does not match"),
    ],
)
def test_rejections_name_the_failed_check(headers: dict[str, str], check: str) -> None:
    message = refused(verifier(hmac_secret=SECRET), headers)
    assert check in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(-300, True), (300, True), (-301, False), (301, False), (-86_400, False), (86_400, False)],
)
def test_timestamps_at_and_past_the_tolerance(offset: int, accepted: bool) -> None:
    verify = verifier(hmac_secret=SECRET, signature_tolerance_s=300)
    for stamp in (str(NOW + offset), str((NOW + offset) * 1000)):  # seconds, and milliseconds
        headers = {"x-signature": sign(BODY, stamp), "x-timestamp": stamp}
        if accepted:
            verify(BODY, headers)
        else:
            message = refused(verify, headers)
            assert ("too old" if offset < 0 else "in the future") in message


def test_a_tolerance_of_zero_checks_no_age_but_still_the_signature() -> None:
    verify = verifier(hmac_secret=SECRET, signature_tolerance_s=0)
    verify(BODY, {"x-signature": sign(BODY, "1"), "x-timestamp": "1"})
    assert "does not match" in refused(verify, {"x-signature": sign(BODY, "1"), "x-timestamp": "2"})


def test_prefix_and_base64_rejections() -> None:
    verify = verifier(hmac_secret=SECRET, hmac_prefix="sha256=", hmac_payload="{body}", hmac_encoding="base64")
    good = base64.b64encode(hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()).decode()
    verify(BODY, {"x-signature": f"sha256={good}"})
    assert "prefix" in refused(verify, {"x-signature": good})
    assert "not base64" in refused(verify, {"x-signature": "sha256=***"})
    assert "does not match" in refused(verify, {"x-signature": "sha256=" + base64.b64encode(b"x" * 32).decode()})


def test_header_names_are_settings() -> None:
    verify = verifier(hmac_secret=SECRET, hmac_signature_header="X-Custom-Sig", hmac_timestamp_header="X-Custom-Ts")
    stamp = str(NOW)
    verify(BODY, {"x-custom-sig": sign(BODY, stamp), "x-custom-ts": stamp})
    assert "missing x-custom-sig" in refused(verify, {"x-signature": sign(BODY, stamp), "x-timestamp": stamp})


@pytest.mark.parametrize(
    "headers",
    [
        {"x-vapi-secret": "shared-s3cret-value"},
        {"authorization": "Bearer shared-s3cret-value"},
        {"authorization": "bearer  shared-s3cret-value "},
        {"x-vapi-secret": "wrong", "authorization": "Bearer shared-s3cret-value"},
    ],
)
def test_the_shared_secret_in_either_header(headers: dict[str, str]) -> None:
    verifier(secret="shared-s3cret-value")(BODY, headers)


@pytest.mark.parametrize(
    ("headers", "check"),
    [
        ({}, "missing X-Vapi-Secret or Authorization: Bearer"),
        ({"authorization": "Basic abc"}, "missing X-Vapi-Secret or Authorization: Bearer"),
        ({"x-vapi-secret": "wrong"}, "wrong Vapi secret"),
        ({"x-vapi-secret": ""}, "wrong Vapi secret"),
        ({"authorization": "Bearer shared-s3cret-valuE"}, "wrong Vapi secret"),
    ],
)
def test_a_missing_or_wrong_shared_secret(headers: dict[str, str], check: str) -> None:
    message = refused(verifier(secret="shared-s3cret-value"), headers)
    assert check in message
    assert "shared-s3cret-value" not in message


def test_a_named_secret_header() -> None:
    verify = verifier(secret="shared-s3cret-value", secret_header="X-Api-Key")
    verify(BODY, {"x-api-key": "shared-s3cret-value"})
    verify(BODY, {"x-api-key": "Bearer shared-s3cret-value"})
    assert "missing x-api-key" in refused(verify, {"x-vapi-secret": "shared-s3cret-value"})
    assert "wrong Vapi secret" in refused(verify, {"x-api-key": "nope"})


def test_both_checks_when_both_are_set() -> None:
    verify = verifier(secret="shared-s3cret-value", hmac_secret=SECRET)
    signed = {"x-signature": sign(BODY, str(NOW)), "x-timestamp": str(NOW)}
    verify(BODY, {**signed, "x-vapi-secret": "shared-s3cret-value"})
    refused(verify, signed)
    refused(verify, {"x-vapi-secret": "shared-s3cret-value"})


def test_nothing_to_check_when_nothing_is_set() -> None:
    assert authenticate(VapiSettings()) is None


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("hmac_payload", "{timestamp}.{url}.{body}", "unknown placeholder {url}"),
        ("hmac_payload", "{timestamp}", "{body} exactly once"),
        ("hmac_payload", "{body}{body}", "{body} exactly once"),
        ("hmac_algorithm", "md5", "webhooks.vapi.hmac_algorithm"),
        ("hmac_encoding", "base32", "webhooks.vapi.hmac_encoding"),
        ("signature_tolerance_s", "-1", "webhooks.vapi.signature_tolerance_s"),
    ],
)
def test_settings_that_cannot_work_stop_start_up(setting: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.vapi") as raised:
        load_config(Path("/dev/null"), environ={f"TRANSCRIPTD_WEBHOOKS_VAPI_{setting.upper()}": value})
    assert named in str(raised.value)


def test_a_secret_that_is_not_base64_stops_start_up_without_showing_it() -> None:
    env = {
        "TRANSCRIPTD_WEBHOOKS_VAPI_HMAC_SECRET": "not*base64!",
        "TRANSCRIPTD_WEBHOOKS_VAPI_HMAC_SECRET_IS_BASE64": "1",
    }
    with pytest.raises(ConfigError) as raised:
        load_config(Path("/dev/null"), environ=env)
    assert "not base64" in str(raised.value)
    assert "not*base64!" not in str(raised.value)
