"""The viewer's login: ``api.token`` typed once into a form, then an HttpOnly, SameSite=Strict cookie.

Why a form and a cookie rather than HTTP Basic: the people who read calls get a page that says what to type, a
password manager fills it, and "Sign out" ends the session (a browser keeps Basic credentials until it quits).
The cookie is not the token: it is an expiry time and an HMAC of it keyed by the token, so a cookie cannot be
turned back into the token that also opens the JSON API, it stops working after ``SESSION_S`` and every
cookie dies when the token changes. The token never goes into a URL: the form is POSTed.

Cross-site requests: the cookie is ``SameSite=Strict``, so another site's form or link never carries it, and
the pages behind it only read. The two forms that act (sign in, sign out) also refuse a POST whose ``Origin``
(or ``Sec-Fetch-Site``) says it came from elsewhere: no other site can sign a browser in with a token of its
choosing (login CSRF) or sign it out.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from daemon.auth import same_secret
from daemon.errors import PayloadTooLarge, TranscriptdError

COOKIE = "transcriptd_ui"
COOKIE_PATH = "/ui"
SESSION_S = 12 * 3600  # a working day: then the token is asked for again
MAX_FORM_BYTES = 4096  # a token and a path back: anything longer is not our form
_PURPOSE = b"transcriptd viewer session v1"

# Every /ui response: no script runs at all (there is none to run: a <script> said in a call is text), styles
# only from our own stylesheet, forms only to ourselves, no framing (clickjacking), and no Referer carrying a
# conversation id to another site (a recording's host); "same-origin", not "no-referrer", which would make
# the browser send `Origin: null` with our own forms.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
# Transcripts are personal data: no shared cache keeps a page, and the back button after sign-out reloads it.
NO_STORE = {"Cache-Control": "no-store"}


class Forbidden(TranscriptdError):
    status, code = 403, "forbidden"


def _mac(token: str, expires: int) -> str:
    return hmac.new(token.encode(), _PURPOSE + b" " + str(expires).encode(), hashlib.sha256).hexdigest()


def issue(token: str, now: float) -> str:
    """A cookie value good until ``now + SESSION_S``."""
    expires = int(now) + SESSION_S
    return f"{expires}.{_mac(token, expires)}"


def valid(cookie: str, token: str, now: float) -> bool:
    expires_text, _, mac = cookie.partition(".")
    if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    return same_secret(mac, _mac(token, expires)) and now < expires


def signed_in(request: Request, token: str, clock: Callable[[], float] = time.time) -> bool:
    """With no token set, everyone is (serve already refused a non-loopback address without
    ``api.reads_open_to_everyone``); otherwise a valid cookie, or ``Authorization: Bearer <token>`` for scripts."""
    if not token:
        return True
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and valid(cookie, token, clock()):
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and same_secret(given.strip(), token)


def check_same_origin(request: Request) -> None:
    """A 403 for a POST another site's page made: browsers say where a POST comes from in ``Origin`` and
    ``Sec-Fetch-Site``. A client sending neither (curl) is no browser and carries no one's cookie."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(f"a form posted from another site ({site}) is refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != own_origin(request):
        raise Forbidden("a form posted from another origin is refused")


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body of at most ``MAX_FORM_BYTES``, read without trusting its
    Content-Length; the last value of a repeated field wins."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"a form over {MAX_FORM_BYTES} bytes")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a path of the viewer only, never another host (an open redirect)."""
    if (
        path
        and path.startswith(f"{COOKIE_PATH}/")
        and not path.startswith("//")
        and "\\" not in path
        and path.isprintable()
    ):
        return path
    return f"{COOKIE_PATH}/"


def set_cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        # Behind a TLS-terminating proxy that says so (uvicorn's proxy headers), the cookie travels on HTTPS only.
        secure=request.url.scheme == "https",
    )
