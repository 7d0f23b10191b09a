"""Retell signatures made the vendor's way: by the installed ``retell-sdk``, not by the code under test."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from retell.lib import webhook_auth

# The official test vector of retell-python-sdk's tests/test_webhook_auth.py.
SDK_BODY = '{"event":"call_ended"}'
SDK_API_KEY = "test-api-key"
SDK_TIMESTAMP = 1_700_000_000_000
SDK_TIMEOUT = 5 * 60 * 1000
SDK_DIGEST = "07024cabe7dd8f6d1c6e4a8324ca92c812e6ad4a7ee506c04f7e462e3321823e"

# The SDK's functions are untyped: typed here once, as its own tests do.
_sign = cast(Callable[..., str], webhook_auth.symmetric["sign"])
_verify = cast(Callable[..., bool], webhook_auth.symmetric["verify"])


def sign(body: bytes | str, api_key: str, timestamp_ms: int | None = None) -> str:
    """The ``X-Retell-Signature`` value Retell sends for ``body`` (now, unless a timestamp is given)."""
    text = body.decode() if isinstance(body, bytes) else body
    return _sign(text, api_key, timestamp_ms)


def sdk_accepts(body: bytes | str, api_key: str, signature: str, *, now_ms: int, timeout_ms: int = SDK_TIMEOUT) -> bool:
    """What the SDK's own verifier says of this signature at ``now_ms``."""
    text = body.decode() if isinstance(body, bytes) else body
    return _verify(text, api_key, signature, {"timestamp": now_ms, "timeout": timeout_ms})
