"""Standard Webhooks signatures (https://www.standardwebhooks.com): any source that signs its deliveries.

The signed content is ``"<webhook-id>.<webhook-timestamp>.".encode() + body`` over the body's exact bytes,
as received (never re-serialised), with HMAC-SHA256 and the base64-decoded secret (``whsec_<base64>``).
``webhook-signature`` holds space-separated ``v1,<base64>`` entries; one that matches any configured
secret is enough, so a secret can be rotated by configuring the old and the new one together.

A refusal is a 401 that says which check failed; it never echoes a secret or a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence

from daemon.errors import Unauthorized

SECRET_PREFIX = "whsec_"  # noqa: S105 (the prefix of every secret, not a secret)
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def parse_secrets(setting: str) -> tuple[bytes, ...]:
    """The keys of a setting holding one or more space-separated ``whsec_<base64>`` secrets ("" = none).

    Raises ValueError (naming the secret by position only) if one is not base64.
    """
    keys = []
    for position, secret in enumerate(setting.split(), start=1):
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"signing secret #{position} is not {SECRET_PREFIX}<base64>") from None
        if not key:
            raise ValueError(f"signing secret #{position} is empty")
        keys.append(key)
    return tuple(keys)


def _decode_b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class SignatureVerifier:
    """Checks a delivery's ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers.

    ``clock`` gives the current Unix time; a timestamp more than ``tolerance_s`` away from it, either
    way, is refused (a replayed old delivery, or a sender's clock far off).
    """

    def __init__(self, secrets: str, *, tolerance_s: float, clock: Callable[[], float] = time.time) -> None:
        self.keys = parse_secrets(secrets)
        if not self.keys:
            raise ValueError("no signing secret is configured")
        self.tolerance_s = tolerance_s
        self.clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if ``body`` carries a valid signature of one of the keys; raise ``Unauthorized`` otherwise."""
        webhook_id = headers.get(ID_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        for name, value in ((ID_HEADER, webhook_id), (TIMESTAMP_HEADER, timestamp), (SIGNATURE_HEADER, signature)):
            if not value.strip():
                raise Unauthorized(f"missing {name} header: the delivery must be signed")
        # Bounded length first: int() of thousands of digits raises, and a float() of one overflows.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise Unauthorized(f"malformed {TIMESTAMP_HEADER} header: expected Unix seconds")
        skew = int(timestamp) - self.clock()
        if skew < -self.tolerance_s:
            raise Unauthorized(f"{TIMESTAMP_HEADER} is too old (more than {self.tolerance_s:g} s ago)")
        if skew > self.tolerance_s:
            raise Unauthorized(f"{TIMESTAMP_HEADER} is in the future (more than {self.tolerance_s:g} s ahead)")

        given: list[bytes] = []
        for entry in signature.split():
            version, sep, encoded = entry.partition(",")
            if not sep or not version or not encoded:
                raise Unauthorized(f"malformed {SIGNATURE_HEADER} header: expected space-separated v1,<base64>")
            if version != "v1":
                continue  # another scheme (v1a is asymmetric): not ours to check, another entry may be v1
            decoded = _decode_b64(encoded)
            if decoded is None:
                raise Unauthorized(f"malformed {SIGNATURE_HEADER} header: a v1 signature is not base64")
            given.append(decoded)
        if not given:
            raise Unauthorized(f"no v1 signature in the {SIGNATURE_HEADER} header")

        prefix = f"{webhook_id}.{timestamp}."
        try:
            # latin-1 gives back the header's bytes exactly as they were sent (Starlette decodes them so).
            signed_prefix = prefix.encode("latin-1")
        except UnicodeEncodeError:
            signed_prefix = prefix.encode()
        expected = [_mac(key, signed_prefix, body) for key in self.keys]
        # Every pair is compared, match or not, so the time taken does not say which one matched.
        matched = False
        for mac in expected:
            for candidate in given:
                matched |= hmac.compare_digest(mac, candidate)
        if not matched:
            raise Unauthorized(f"{SIGNATURE_HEADER} does not match: wrong secret, or the body was altered")


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of a delivery we send: one ``v1,<base64>`` entry per key."""
    prefix = f"{webhook_id}.{timestamp}.".encode()
    return " ".join("v1," + base64.b64encode(_mac(key, prefix, body)).decode("ascii") for key in keys)


def _mac(key: bytes, prefix: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of ``prefix + body``, without copying a body that may be megabytes."""
    mac = hmac.new(key, prefix, hashlib.sha256)
    mac.update(body)
    return mac.digest()
