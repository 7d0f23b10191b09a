"""Shared secrets, compared in constant time so they cannot be guessed byte by byte from response times."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from daemon.errors import Unauthorized


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def check_bearer(request: Request, token: str) -> None:
    """``Authorization: Bearer <token>`` when ``token`` is set; nothing to check otherwise."""
    check_bearer_any(request, (token,))


def check_bearer_any(request: Request, tokens: Sequence[str]) -> None:
    """``Authorization: Bearer <one of tokens>`` when any of ``tokens`` is set; nothing to check otherwise."""
    expected = [token for token in tokens if token]
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    # Every token is compared, matching or not, so the time taken does not say which one was close.
    matches = [same_secret(given, token) for token in expected]
    if scheme.lower() != "bearer" or not any(matches):
        error = Unauthorized("missing or wrong bearer token")
        error.headers = {"WWW-Authenticate": "Bearer"}
        raise error


def check_path_token(given: str | None, token: str, source: str) -> None:
    """A webhook's token, carried in its URL path (``webhooks.<source>.token``; Tavus callbacks have no
    signature, so for them it is the only check)."""
    if not token:
        if given is not None:
            raise Unauthorized(f"no token is configured for this endpoint: post to /webhooks/{source}")
        return
    if given is None or not same_secret(given, token):
        raise Unauthorized("missing or wrong webhook token")
