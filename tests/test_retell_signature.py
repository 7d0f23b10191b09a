"""X-Retell-Signature: the SDK's test vector, its boundary and rejection cases, and parity with its verifier."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import Unauthorized
from daemon.sources.retell import SIGNATURE_HEADER, RetellVerifier
from tests.retell_signing import (
    SDK_API_KEY,
    SDK_BODY,
    SDK_DIGEST,
    SDK_TIMEOUT,
    SDK_TIMESTAMP,
    sdk_accepts,
    sign,
)

BODY = SDK_BODY.encode()
VALID = f"v={SDK_TIMESTAMP},d={SDK_DIGEST}"


def verifier_at(now_ms: int, api_key: str = SDK_API_KEY, tolerance_ms: int = SDK_TIMEOUT) -> RetellVerifier:
    return RetellVerifier(api_key, tolerance_ms=tolerance_ms, clock=lambda: now_ms / 1000)


def refusal(verifier: RetellVerifier, signature: str | None, body: bytes = BODY) -> str:
    headers = {} if signature is None else {SIGNATURE_HEADER: signature}
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(body, headers)
    return caught.value.message


def test_the_sdk_signs_the_official_vector() -> None:
    # The vector is the SDK's own: if a new SDK signed otherwise, every test below would mean nothing.
    assert sign(SDK_BODY, SDK_API_KEY, SDK_TIMESTAMP) == VALID


def test_the_official_vector_verifies() -> None:
    verifier_at(SDK_TIMESTAMP).verify(BODY, {SIGNATURE_HEADER: VALID})


@pytest.mark.parametrize("offset", [SDK_TIMEOUT, -SDK_TIMEOUT, 0, 1, -1])
def test_valid_up_to_exactly_the_tolerance_either_way(offset: int) -> None:
    verifier_at(SDK_TIMESTAMP + offset).verify(BODY, {SIGNATURE_HEADER: VALID})


def test_refused_one_millisecond_past_the_tolerance() -> None:
    # The verifier's clock is 300,001 ms after the signature: the signature is too old.
    assert refusal(verifier_at(SDK_TIMESTAMP + SDK_TIMEOUT + 1), VALID) == (
        "X-Retell-Signature timestamp is too old (more than 300 s ago)"
    )
    # ... and 300,001 ms before it: a signature from the future.
    assert refusal(verifier_at(SDK_TIMESTAMP - SDK_TIMEOUT - 1), VALID) == (
        "X-Retell-Signature timestamp is in the future (more than 300 s ahead)"
    )


def test_the_tolerance_is_configurable() -> None:
    verifier_at(SDK_TIMESTAMP + 60_000, tolerance_ms=60_000).verify(BODY, {SIGNATURE_HEADER: VALID})
    assert "too old" in refusal(verifier_at(SDK_TIMESTAMP + 60_001, tolerance_ms=60_000), VALID)


@pytest.mark.parametrize(
    "signature",
    [
        f"v={SDK_TIMESTAMP}",
        f"d={SDK_DIGEST},v={SDK_TIMESTAMP}",
        f"prefix-v={SDK_TIMESTAMP},d={SDK_DIGEST}",
        f"v={SDK_TIMESTAMP},d={SDK_DIGEST}-suffix",
        f"v={SDK_TIMESTAMP},d=not-hex",
        f"v={SDK_TIMESTAMP},d={SDK_DIGEST[2:]}",
        f"v=-{SDK_TIMESTAMP},d={SDK_DIGEST}",
        f"v={SDK_TIMESTAMP},d={SDK_DIGEST},extra=value",
        # Beyond the SDK's list: upper-case hex, spaces, another separator, a timestamp of 17 digits.
        f"v={SDK_TIMESTAMP},d={SDK_DIGEST.upper()}",
        f"v={SDK_TIMESTAMP}, d={SDK_DIGEST}",
        f"v={SDK_TIMESTAMP};d={SDK_DIGEST}",
        f"v=1{SDK_TIMESTAMP:016d},d={SDK_DIGEST}",
        f"v={SDK_TIMESTAMP}.5,d={SDK_DIGEST}",
    ],
)
def test_malformed_headers_are_refused_as_malformed(signature: str) -> None:
    assert refusal(verifier_at(SDK_TIMESTAMP), signature).startswith("malformed X-Retell-Signature header")
    assert not sdk_accepts(BODY, SDK_API_KEY, signature, now_ms=SDK_TIMESTAMP)


@pytest.mark.parametrize("signature", [None, "", "   "])
def test_a_missing_header_is_named(signature: str | None) -> None:
    assert refusal(verifier_at(SDK_TIMESTAMP), signature).startswith("missing X-Retell-Signature header")


def test_a_tampered_body_a_wrong_key_and_another_bodys_signature_do_not_match() -> None:
    expected = "X-Retell-Signature does not match: wrong API key, or the body was altered"
    assert refusal(verifier_at(SDK_TIMESTAMP), VALID, body=BODY + b" ") == expected
    assert refusal(verifier_at(SDK_TIMESTAMP, api_key="wrong-api-key"), VALID) == expected
    other = sign('{"event":"call_started"}', SDK_API_KEY, SDK_TIMESTAMP)
    assert refusal(verifier_at(SDK_TIMESTAMP), other) == expected


def test_a_signature_with_another_timestamp_does_not_match() -> None:
    # The digest covers the timestamp: moving v within the window breaks it.
    moved = f"v={SDK_TIMESTAMP + 1},d={SDK_DIGEST}"
    assert "does not match" in refusal(verifier_at(SDK_TIMESTAMP), moved)


def test_a_zero_padded_timestamp_is_the_same_instant_as_for_the_sdk() -> None:
    padded = f"v=000{SDK_TIMESTAMP},d={SDK_DIGEST}"
    assert sdk_accepts(BODY, SDK_API_KEY, padded, now_ms=SDK_TIMESTAMP)
    verifier_at(SDK_TIMESTAMP).verify(BODY, {SIGNATURE_HEADER: padded})


def test_a_signature_the_sdk_makes_now_verifies_against_the_real_clock() -> None:
    body = b'{"event":"call_analyzed","call":{"call_id":"c-now"}}'
    RetellVerifier("key_live").verify(body, {SIGNATURE_HEADER: sign(body, "key_live")})


def test_any_of_several_keys_verifies_so_a_key_can_be_rotated() -> None:
    both = RetellVerifier(f"key_old {SDK_API_KEY}", clock=lambda: SDK_TIMESTAMP / 1000)
    both.verify(BODY, {SIGNATURE_HEADER: VALID})
    assert "does not match" in refusal(RetellVerifier("key_old key_new", clock=lambda: SDK_TIMESTAMP / 1000), VALID)


def test_no_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="no Retell API key"):
        RetellVerifier("  ")


def test_the_refusal_never_echoes_the_key_or_the_signature() -> None:
    for message in (
        refusal(verifier_at(SDK_TIMESTAMP, api_key="key_secret"), VALID),
        refusal(verifier_at(SDK_TIMESTAMP), f"v={SDK_TIMESTAMP},d=zz"),
    ):
        assert "key_secret" not in message
        assert SDK_DIGEST not in message


# Header values as a server hands them over: latin-1 text (Starlette decodes them so).
_header_text = st.text(alphabet=st.characters(max_codepoint=255), max_size=90)
_keys = st.text(alphabet=st.characters(blacklist_categories=("Zs", "Cc", "Cs")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    body=st.text(max_size=200),
    key=_keys,
    sent_ms=st.integers(min_value=0, max_value=10**13),
    skew_ms=st.integers(min_value=-2 * SDK_TIMEOUT, max_value=2 * SDK_TIMEOUT),
    tamper=st.sampled_from(["none", "body", "key", "header"]),
    junk=_header_text,
)
def test_accepts_exactly_what_the_sdk_accepts(
    body: str, key: str, sent_ms: int, skew_ms: int, tamper: str, junk: str
) -> None:
    signature = sign(body, key, sent_ms)
    checked_body, checked_key = body, key
    if tamper == "body":
        checked_body = body + "x"
    elif tamper == "key":
        checked_key = key + "x"
    elif tamper == "header":
        signature = junk
    now_ms = sent_ms + skew_ms
    ours = RetellVerifier(checked_key, clock=lambda: now_ms / 1000)
    try:
        ours.verify(checked_body.encode(), {SIGNATURE_HEADER: signature})
        accepted = True
    except Unauthorized:
        accepted = False
    assert accepted == sdk_accepts(checked_body, checked_key, signature, now_ms=now_ms)


def test_the_default_tolerance_is_five_minutes() -> None:
    now = time.time()
    stale = sign(BODY, SDK_API_KEY, round((now - 301) * 1000))
    fresh = sign(BODY, SDK_API_KEY, round((now - 299) * 1000))
    verifier = RetellVerifier(SDK_API_KEY, clock=lambda: now)
    verifier.verify(BODY, {SIGNATURE_HEADER: fresh})
    assert "too old" in refusal(verifier, stale)
