"""How a Vapi server message is authenticated: ``webhooks.vapi.*``, and the check over the raw request.

Vapi sends the credential of the server URL's ``credentialId`` with every message. Two kinds are
checked here (OAuth 2.0 credentials are tokens transcriptd would have to issue: not supported):

- a shared secret (``webhooks.vapi.secret``), sent as ``X-Vapi-Secret: <secret>`` (the legacy inline
  ``secret``, and a Bearer Token credential with that header name and no prefix) or as
  ``Authorization: Bearer <secret>`` (a Bearer Token credential's default); ``secret_header`` names
  another header a credential was given;
- an HMAC signature (``webhooks.vapi.hmac_secret``). Vapi lets the customer choose the algorithm, the
  signature and timestamp headers, the signed payload, the encoding and a prefix, and documents no unit
  or tolerance for the timestamp and no test vector: every part is a setting, with Vapi's documented
  defaults (``HMACAuthenticationPlan`` in Vapi's OpenAPI schema: ``x-signature``, ``x-timestamp``,
  ``{timestamp}.{body}``, hex, SHA-256). The timestamp is read as Unix seconds, or milliseconds when it
  is too large to be seconds.

Both are checked when both are set. Every comparison is constant-time; a refusal is a 401 naming the
failed check, never a secret or a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Literal

import msgspec

from daemon.auth import same_secret
from daemon.errors import Unauthorized
from daemon.sources.model import Secret, Verify, WebhookSettings

PLACEHOLDER = re.compile(r"{([^{}]*)}")
PLACEHOLDERS = frozenset({"timestamp", "body", "method"})
# Unix seconds stay under this until the year 5138; a larger value is milliseconds.
MAX_SECONDS = 10**11
ALGORITHMS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512, "sha1": hashlib.sha1}


class VapiSettings(WebhookSettings, frozen=True):
    """``webhooks.vapi.*``."""

    secret: Secret = ""
    secret_header: str = ""  # "" = X-Vapi-Secret or Authorization: Bearer
    hmac_secret: Secret = ""
    hmac_secret_is_base64: bool = False
    hmac_algorithm: Literal["sha256", "sha512", "sha1"] = "sha256"
    hmac_signature_header: str = "x-signature"
    hmac_timestamp_header: str = "x-timestamp"
    hmac_payload: str = "{timestamp}.{body}"
    hmac_encoding: Literal["hex", "base64"] = "hex"
    hmac_prefix: str = ""
    signature_tolerance_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    # Reconcile fetches missed calls from Vapi's API with this private key (Bearer); "" turns it off.
    api_key: Secret = ""
    api_url: str = "https://api.vapi.ai"

    def __post_init__(self) -> None:
        # A setting that cannot work stops start-up, rather than refusing every message.
        names = PLACEHOLDER.findall(self.hmac_payload)
        unknown = sorted(set(names) - PLACEHOLDERS)
        if unknown:
            raise ValueError(f"hmac_payload: unknown placeholder {{{unknown[0]}}} (known: body, method, timestamp)")
        if names.count("body") != 1:
            raise ValueError("hmac_payload must hold {body} exactly once")
        if self.hmac_secret and self.hmac_secret_is_base64:
            _decode_b64(self.hmac_secret, "hmac_secret is not base64")
        if self.hmac_secret and not self.hmac_signature_header.strip():
            raise ValueError("hmac_signature_header is empty")
        if "timestamp" in names and not self.hmac_timestamp_header.strip():
            raise ValueError("hmac_payload signs {timestamp}: hmac_timestamp_header is empty")


def authenticate(settings: VapiSettings, *, clock: Callable[[], float] = time.time) -> Verify | None:
    checks: list[Verify] = []
    if settings.secret:
        checks.append(_secret_check(settings.secret, settings.secret_header.strip().lower()))
    if settings.hmac_secret:
        checks.append(HmacVerifier(settings, clock=clock).verify)
    if not checks:
        return None

    def verify(body: bytes, headers: Mapping[str, str]) -> None:
        for check in checks:
            check(body, headers)

    return verify


def _secret_check(secret: str, header: str) -> Verify:
    def verify(body: bytes, headers: Mapping[str, str]) -> None:
        if header:
            given = _without_bearer(headers.get(header, ""))
            if not given:
                raise Unauthorized(f"missing {header} header: the Vapi secret is required")
            if not same_secret(given, secret):
                raise Unauthorized(f"wrong Vapi secret in the {header} header")
            return
        legacy = headers.get("x-vapi-secret")
        scheme, _, bearer = headers.get("authorization", "").strip().partition(" ")
        if legacy is None and scheme.lower() != "bearer":
            raise Unauthorized("missing X-Vapi-Secret or Authorization: Bearer header: the Vapi secret is required")
        # Each header given is compared, so the time taken does not say which one was checked.
        matched = False
        if legacy is not None:
            matched |= same_secret(legacy.strip(), secret)
        if scheme.lower() == "bearer":
            matched |= same_secret(bearer.strip(), secret)
        if not matched:
            raise Unauthorized("wrong Vapi secret (X-Vapi-Secret or Authorization: Bearer)")

    return verify


def _without_bearer(value: str) -> str:
    value = value.strip()
    scheme, sep, rest = value.partition(" ")
    return rest.strip() if sep and scheme.lower() == "bearer" else value


class HmacVerifier:
    """Checks the HMAC signature header over the payload template, as configured."""

    def __init__(self, settings: VapiSettings, *, clock: Callable[[], float] = time.time) -> None:
        key = settings.hmac_secret
        self.key = _decode_b64(key, "hmac_secret is not base64") if settings.hmac_secret_is_base64 else key.encode()
        self.digest = ALGORITHMS[settings.hmac_algorithm]
        self.signature_header = settings.hmac_signature_header.strip().lower()
        self.timestamp_header = settings.hmac_timestamp_header.strip().lower()
        self.encoding = settings.hmac_encoding
        self.prefix = settings.hmac_prefix
        self.tolerance_s = settings.signature_tolerance_s
        self.clock = clock
        # The template around {body}: the parts before and after are small; the body is never copied.
        head, _, tail = settings.hmac_payload.partition("{body}")
        self.head, self.tail = head, tail
        self.signs_timestamp = "{timestamp}" in settings.hmac_payload

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        signature = headers.get(self.signature_header, "").strip()
        if not signature:
            raise Unauthorized(f"missing {self.signature_header} header: the message must be signed")
        timestamp = ""
        if self.signs_timestamp:
            timestamp = headers.get(self.timestamp_header, "").strip()
            if not timestamp:
                raise Unauthorized(f"missing {self.timestamp_header} header: the signature covers a timestamp")
            self._check_age(timestamp)
        given = self._decode(signature)
        mac = hmac.new(self.key, self._fill(self.head, timestamp), self.digest)
        mac.update(body)
        mac.update(self._fill(self.tail, timestamp))
        if not hmac.compare_digest(mac.digest(), given):
            raise Unauthorized(f"{self.signature_header} does not match: wrong secret, or the body was altered")

    def _check_age(self, timestamp: str) -> None:
        # Bounded length first: int() of thousands of digits is slow, and a float() of one overflows.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16):
            raise Unauthorized(f"malformed {self.timestamp_header} header: expected Unix seconds or milliseconds")
        if not self.tolerance_s:
            return
        value = int(timestamp)
        seconds = value / 1000 if value >= MAX_SECONDS else float(value)
        skew = seconds - self.clock()
        if skew < -self.tolerance_s:
            raise Unauthorized(f"{self.timestamp_header} is too old (more than {self.tolerance_s:g} s ago)")
        if skew > self.tolerance_s:
            raise Unauthorized(f"{self.timestamp_header} is in the future (more than {self.tolerance_s:g} s ahead)")

    def _decode(self, signature: str) -> bytes:
        if self.prefix:
            if not signature.startswith(self.prefix):
                raise Unauthorized(f"malformed {self.signature_header} header: expected the prefix {self.prefix!r}")
            signature = signature[len(self.prefix) :]
        if self.encoding == "hex":
            try:
                return bytes.fromhex(signature)
            except ValueError:
                raise Unauthorized(f"malformed {self.signature_header} header: the signature is not hex") from None
        try:
            return base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise Unauthorized(f"malformed {self.signature_header} header: the signature is not base64") from None

    @staticmethod
    def _fill(part: str, timestamp: str) -> bytes:
        # The timestamp was checked to be ASCII digits; the template is the operator's own text.
        return part.replace("{timestamp}", timestamp).replace("{method}", "POST").encode()


def _decode_b64(value: str, problem: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(problem) from None
