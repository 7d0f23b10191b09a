"""ElevenLabs-Signature: every case of elevenlabs-python's tests/test_webhooks.py, signed the SDK's way, with the
installed SDK's construct_event as the reference for what is accepted and what is refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from elevenlabs.client import ElevenLabs
from elevenlabs.errors import BadRequestError
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import Unauthorized
from daemon.sources.elevenlabs_signature import DEFAULT_FUTURE_SKEW_S, DEFAULT_TOLERANCE_S, ElevenLabsSignature
from tests.conftest import TEST_SECRETS

SECRET = TEST_SECRETS[TEST_SECRETS.index("wsec_transcriptd-test-elevenlabs-1")]
OTHER = TEST_SECRETS[TEST_SECRETS.index("wsec_transcriptd-test-elevenlabs-2")]
NOW = 1_600_000_000  # the SDK's own fixed time (test_construct_event_mocked_time)
# The SDK tests' payload, serialised as they serialise it.
BODY = json.dumps({"event_type": "speech.completed", "id": "123456"})

SDK = ElevenLabs(api_key="unused").webhooks  # no request is made: construct_event is local


def sdk_signature(body: str, secret: str, timestamp: str) -> str:
    """The header exactly as the SDK's tests build it."""
    message = f"{timestamp}.{body}"
    signature = "v0=" + hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"t={timestamp},{signature}"


def verifier(secrets: str = SECRET, now: float = NOW) -> ElevenLabsSignature:
    return ElevenLabsSignature(secrets, clock=lambda: now)


@contextmanager
def sdk_clock(now: float) -> Iterator[None]:
    # The SDK reads time.time() itself; its own test patches it the same way.
    with mock.patch("time.time", return_value=now):
        yield


def ours(header: str | None, body: str = BODY, *, secrets: str = SECRET, now: float = NOW) -> str | None:
    """None if accepted, else the 401's message."""
    headers = {} if header is None else {"elevenlabs-signature": header}
    try:
        verifier(secrets, now).verify(body.encode(), headers)
    except Unauthorized as exc:
        refused = exc
    else:
        return None
    assert refused.status == 401
    assert SECRET not in refused.message
    assert OTHER not in refused.message
    return refused.message


def sdk(header: str | None, body: str = BODY, *, secret: str = SECRET, now: float = NOW) -> str | None:
    """None if the SDK accepts, else its error."""
    with sdk_clock(now):
        try:
            event: Any = SDK.construct_event(body, header or "", secret)
        except BadRequestError as exc:
            return str(exc)
        except json.JSONDecodeError:
            return None  # the signature passed; only the SDK's json.loads of the body failed
        except ValueError as exc:
            return f"the SDK raised {exc!r}"  # int() of a t= that is not a number: refused, by a crash
    # Compared as JSON text: a body of NaN decodes to a float that equals nothing, itself included.
    assert json.dumps(event) == json.dumps(json.loads(body))
    return None


# The cases of the SDK's tests/test_webhooks.py, one by one.


def test_valid_signature() -> None:
    header = sdk_signature(BODY, SECRET, str(NOW))
    assert sdk(header) is None
    assert ours(header) is None


def test_the_sdk_tests_fixed_vector() -> None:
    """test_construct_event_mocked_time, as a fixed vector: its secret, payload and time, and the digest
    they give (computed once, written here, so this does not depend on the signing helper above)."""
    sdk_secret = "test_secret"  # the SDK test's own; configured in no daemon, so it never reaches a log
    digest = "f8a0d1dc33ee963cb54d2f31514555995e93313c9d2042c030adbb82b87fae13"
    header = f"t=1600000000,v0={digest}"
    assert header == sdk_signature(BODY, sdk_secret, "1600000000")
    assert sdk(header, secret=sdk_secret) is None
    ElevenLabsSignature(sdk_secret, clock=lambda: 1_600_000_000).verify(BODY.encode(), {"elevenlabs-signature": header})
    with pytest.raises(Unauthorized, match="does not match"):
        ElevenLabsSignature(sdk_secret, clock=lambda: 1_600_000_000).verify(
            BODY.encode(), {"elevenlabs-signature": header.replace("f8a0", "f8a1")}
        )


def test_valid_signature_at_the_current_time() -> None:
    # test_construct_event_valid_signature signs with time.time(): so does this, with the real clock.
    timestamp = str(int(time.time()))
    header = sdk_signature(BODY, SECRET, timestamp)
    ElevenLabsSignature(SECRET).verify(BODY.encode(), {"elevenlabs-signature": header})
    assert SDK.construct_event(BODY, header, SECRET) == json.loads(BODY)


def test_missing_signature_header() -> None:
    assert "Missing signature header" in str(sdk(None))
    assert "missing ElevenLabs-Signature header" in str(ours(None))
    assert "missing" in str(ours(""))
    assert "missing" in str(ours("   "))


def test_invalid_signature_format() -> None:
    assert "No signature hash found with expected scheme v0" in str(sdk("invalid_format"))
    assert "malformed" in str(ours("invalid_format"))


def test_expired_timestamp() -> None:
    header = sdk_signature(BODY, SECRET, str(NOW - 31 * 60))
    assert "Timestamp outside the tolerance zone" in str(sdk(header))
    assert "too old" in str(ours(header))


def test_invalid_signature() -> None:
    header = f"t={NOW},v0=invalid_signature"
    assert "Signature hash does not match" in str(sdk(header))
    assert ours(header) is not None


def test_missing_secret() -> None:
    header = f"t={NOW},v0=some_signature"
    assert "Webhook secret not configured" in str(sdk(header, secret=""))
    # Here a missing secret is a configuration error, refused when the verifier is built (and the
    # endpoint answers 503: our failure, not the sender's).
    with pytest.raises(ValueError, match="no signing secret"):
        ElevenLabsSignature("")
    with pytest.raises(ValueError, match="no signing secret"):
        ElevenLabsSignature("  ")


# Boundaries and the cases the SDK does not test.


@pytest.mark.parametrize(
    ("age_s", "accepted_by_sdk", "accepted"),
    [
        (DEFAULT_TOLERANCE_S, True, True),  # exactly 30 minutes old: both accept
        (DEFAULT_TOLERANCE_S + 1, False, False),
        (0, True, True),
        (-DEFAULT_FUTURE_SKEW_S, True, True),  # 5 minutes ahead: accepted
        (-DEFAULT_FUTURE_SKEW_S - 1, True, False),  # the SDK takes any future time; this refuses it
        (-10 * 365 * 86400, True, False),
    ],
)
def test_timestamp_bounds(age_s: float, accepted_by_sdk: bool, accepted: bool) -> None:
    header = sdk_signature(BODY, SECRET, str(int(NOW - age_s)))
    assert (sdk(header) is None) is accepted_by_sdk
    message = ours(header)
    assert (message is None) is accepted, message
    if not accepted:
        assert ("too old" if age_s > 0 else "in the future") in str(message)


def test_tolerances_are_configurable() -> None:
    header = sdk_signature(BODY, SECRET, str(NOW - 100))
    strict = ElevenLabsSignature(SECRET, tolerance_s=99, future_skew_s=0, clock=lambda: NOW)
    with pytest.raises(Unauthorized, match="too old"):
        strict.verify(BODY.encode(), {"elevenlabs-signature": header})
    ahead = sdk_signature(BODY, SECRET, str(NOW + 1))
    with pytest.raises(Unauthorized, match="in the future"):
        strict.verify(BODY.encode(), {"elevenlabs-signature": ahead})


def test_a_signature_over_another_body_is_refused() -> None:
    header = sdk_signature(BODY, SECRET, str(NOW))
    reserialised = json.dumps(json.loads(BODY), indent=2, sort_keys=True)
    assert json.loads(reserialised) == json.loads(BODY)
    for other in (reserialised, BODY + " ", BODY.replace("123456", "123457"), ""):
        assert sdk(header, other) is not None
        assert "does not match" in str(ours(header, other))


def test_a_wrong_secret_is_refused_and_rotation_takes_either() -> None:
    header = sdk_signature(BODY, OTHER, str(NOW))
    assert "does not match" in str(ours(header))
    assert ours(header, secrets=f"{SECRET} {OTHER}") is None
    assert ours(sdk_signature(BODY, SECRET, str(NOW)), secrets=f"{SECRET} {OTHER}") is None


def test_the_signature_is_over_the_bytes_received() -> None:
    # A body that is not UTF-8 is still verified over its bytes (the SDK cannot take it at all).
    body = b'{"type": "x", "data": {"name": "\xff"}}'
    digest = hmac.new(SECRET.encode(), f"{NOW}.".encode() + body, hashlib.sha256).hexdigest()
    verifier().verify(body, {"elevenlabs-signature": f"t={NOW},v0={digest}"})
    with pytest.raises(Unauthorized, match="does not match"):
        verifier().verify(body + b"x", {"elevenlabs-signature": f"t={NOW},v0={digest}"})


@pytest.mark.parametrize(
    "header",
    [
        f"v0={'0' * 64}",  # no t=
        f"t={NOW}",  # no v0=
        f"t={NOW},v1={'0' * 64}",  # another scheme only
        f"t=,v0={'0' * 64}",
        f"t=abc,v0={'0' * 64}",
        f"t=-5,v0={'0' * 64}",
        f"t=+{NOW},v0={'0' * 64}",
        f"t={'9' * 40},v0={'0' * 64}",  # a number no clock reaches (the SDK computes with it)
        f"t=\uff11\uff12\uff13,v0={'0' * 64}",  # full-width digits: int() takes them, this does not
        f"t={NOW},v0=",
        f"t={NOW},v0={'0' * 63}",
        f"t={NOW},v0={'g' * 64}",
        f"t={NOW},t={NOW},v0={'0' * 64}",
        f"t={NOW},v0={'0' * 64},v0={'1' * 64}",
        f"t={NOW}, v0={'0' * 64}",  # the SDK does not trim spaces either
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    message = ours(header)
    assert message is not None
    assert "malformed" in message or "too old" in message or "in the future" in message, message
    assert sdk(header) is not None


def test_upper_case_hex_is_refused_as_the_sdk_refuses_it() -> None:
    header = sdk_signature(BODY, SECRET, str(NOW))
    upper = header.replace(header.split("v0=")[1], header.split("v0=")[1].upper())
    assert sdk(upper) is not None
    assert "does not match" in str(ours(upper))


def test_the_order_of_t_and_v0_does_not_matter() -> None:
    t, v0 = sdk_signature(BODY, SECRET, str(NOW)).split(",")
    assert sdk(f"{v0},{t}") is None
    assert ours(f"{v0},{t}") is None
    assert ours(f"{t},v1=whatever,{v0}") is None  # an unknown scheme beside v0 is ignored, as by the SDK
    assert sdk(f"{t},v1=whatever,{v0}") is None


@settings(max_examples=300, deadline=None)
@given(
    body=st.text(max_size=200),
    age=st.integers(min_value=-4000, max_value=4000),
    secret=st.sampled_from([SECRET, OTHER]),
    mutation=st.sampled_from(["none", "body", "swap", "space", "drop_t", "extra"]),
)
def test_whatever_is_accepted_the_sdk_accepts(body: str, age: int, secret: str, mutation: str) -> None:
    """Accepted here implies accepted by the SDK; a genuine signature in the window is always accepted."""
    header = sdk_signature(body, secret, str(NOW - age))
    sent = body
    match mutation:
        case "body":
            sent = body + "!"
        case "swap":
            t, v0 = header.split(",")
            header = f"{v0},{t}"
        case "space":
            header = header.replace(",", ", ")
        case "drop_t":
            header = header.split(",")[1]
        case "extra":
            header += ",v1=x"
    accepted = ours(header, sent) is None
    if accepted:
        assert sdk(header, sent, secret=SECRET) is None
    in_window = -DEFAULT_FUTURE_SKEW_S <= age <= DEFAULT_TOLERANCE_S
    genuine = secret == SECRET and mutation in ("none", "swap", "extra")
    assert accepted is (genuine and in_window)
