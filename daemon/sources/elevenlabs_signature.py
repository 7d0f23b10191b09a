"""The ``ElevenLabs-Signature`` header: ``t=<unix seconds>,v0=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``.

As elevenlabs-python's ``construct_event`` (``src/elevenlabs/webhooks_custom.py``) computes it, with three
differences: the digests are compared in constant time (the SDK uses ``!=``), a timestamp too far in the
future is refused as well as one too old (the SDK checks only the past), and the MAC is taken over the
body's bytes as received rather than over a decoded string, so nothing is decoded before it is trusted.

A refusal is a 401 naming the check that failed; it never echoes a secret or a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import string
import time
from collections.abc import Callable, Mapping

from daemon.errors import Unauthorized

HEADER = "elevenlabs-signature"  # Starlette's headers are case-insensitive: ElevenLabs sends ElevenLabs-Signature
NAME = "ElevenLabs-Signature"
# The SDK's and the docs' tolerance for an old timestamp: 30 minutes.
DEFAULT_TOLERANCE_S = 1800.0
# The SDK accepts any future timestamp. A signature from the future is either a skewed clock (ElevenLabs'
# or ours) or a delivery held back to be replayed later: five minutes covers any clock that NTP keeps.
DEFAULT_FUTURE_SKEW_S = 300.0
_HEX = frozenset(string.hexdigits)


def parse_secrets(setting: str) -> tuple[bytes, ...]:
    """The keys of a setting holding one or more space-separated secrets ("" = none).

    ElevenLabs' webhook secrets (``wsec_...``) are used as they are, UTF-8 encoded, not base64-decoded:
    the SDK keys its HMAC with ``secret.encode("utf-8")``.
    """
    return tuple(secret.encode() for secret in setting.split())


class ElevenLabsSignature:
    """Checks a delivery's ``ElevenLabs-Signature`` against one or more secrets (several while rotating).

    ``clock`` gives the current Unix time. A timestamp more than ``tolerance_s`` before it, or more than
    ``future_skew_s`` after it, is refused; exactly at either bound is accepted, as the SDK accepts a
    timestamp exactly 30 minutes old.
    """

    def __init__(
        self,
        secrets: str,
        *,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        future_skew_s: float = DEFAULT_FUTURE_SKEW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = parse_secrets(secrets)
        if not self.keys:
            raise ValueError("no signing secret is configured")
        self.tolerance_s = tolerance_s
        self.future_skew_s = future_skew_s
        self.clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if ``body`` carries a valid signature of one of the keys; raise ``Unauthorized`` otherwise."""
        header = headers.get(HEADER, "")
        if not header.strip():
            raise Unauthorized(f"missing {NAME} header: the delivery must be signed")
        timestamp, signature = _parse(header)
        # Bounded length first: int() of thousands of digits raises, and the value would be nonsense anyway.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise Unauthorized(f"malformed {NAME} header: t= must be Unix seconds")
        age = self.clock() - int(timestamp)
        if age > self.tolerance_s:
            raise Unauthorized(f"{NAME} timestamp is too old (more than {self.tolerance_s:g} s ago)")
        if -age > self.future_skew_s:
            raise Unauthorized(f"{NAME} timestamp is in the future (more than {self.future_skew_s:g} s ahead)")
        if len(signature) != 64 or not _HEX.issuperset(signature):
            raise Unauthorized(f"malformed {NAME} header: v0= must be a hex SHA-256 digest")

        # The same bytes the SDK signs when the body is UTF-8 ("{t}.{body}".encode()), for any body.
        prefix = f"{timestamp}.".encode()
        expected = [_mac(key, prefix, body) for key in self.keys]
        # Every key is compared, match or not, so the time taken does not say which one matched. The SDK
        # compares "v0=" + hexdigest() as strings: lower-case hex, which is what is compared here too.
        given = signature.encode()
        matched = False
        for mac in expected:
            matched |= hmac.compare_digest(mac, given)
        if not matched:
            raise Unauthorized(f"{NAME} does not match: wrong secret, or the body was altered")


def _parse(header: str) -> tuple[str, str]:
    """The ``t=`` and ``v0=`` values of the header, split on commas as the SDK splits it (no whitespace
    is trimmed, and other schemes are ignored), so that whatever is accepted here the SDK accepts too."""
    timestamp: str | None = None
    signature: str | None = None
    for item in header.split(","):
        if item.startswith("t="):
            if timestamp is not None:
                raise Unauthorized(f"malformed {NAME} header: more than one t=")
            timestamp = item[2:]
        elif item.startswith("v0="):
            if signature is not None:
                raise Unauthorized(f"malformed {NAME} header: more than one v0=")
            signature = item[3:]
    if not timestamp or not signature:
        raise Unauthorized(f"malformed {NAME} header: expected t=<timestamp>,v0=<signature>")
    return timestamp, signature


def _mac(key: bytes, prefix: bytes, body: bytes) -> bytes:
    """Hex HMAC-SHA256 of ``prefix + body``, without copying a body that may be tens of megabytes."""
    mac = hmac.new(key, prefix, hashlib.sha256)
    mac.update(body)
    return mac.hexdigest().encode()
