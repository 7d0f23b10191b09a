"""The viewer's pages over HTTP (the app in-process): what they show, escaping, headers, sign-in, errors."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from markupsafe import escape

from daemon.ids import quoted
from daemon.ui import session
from tests.conftest import AppClient
from tests.payloads import SYSTEM_PROMPT, encode, envelope, transcription_ready

pytestmark = pytest.mark.anyio

TOKEN = "read-s3cret"  # api.token, from TEST_SECRETS
CALLBACK_TOKEN = "s3cr3t-callback-token"  # in every Tavus body's webhook_url: masked on the raw-body page
HOSTILE = '<script>alert("x")</script><img src=x onerror="alert(1)"> & "quotes" \'too\''
VAPI_SECRET = "viewer-vapi-hmac-secret"
VAPI_REPORT = Path(__file__).parent / "fixtures" / "vapi" / "schema-end-of-call-report-with-tools.json"
PAGES = (
    "/ui/",
    "/ui",
    "/ui/conversations/c-1",
    "/ui/conversations/c-1/",
    "/ui/conversations/c-1/events",
    "/ui/conversations/c-1/events/event/1",
    "/ui/search?q=hello",
    "/ui/search",
)


def hostile_call(cid: str) -> dict[str, Any]:
    body = transcription_ready(cid, turns=3)
    body["properties"]["transcript"][1]["content"] = HOSTILE
    return body


async def post_vapi(client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    body = json.dumps(payload).encode()
    stamp = str(int(time.time()))
    mac = hmac.new(VAPI_SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {"x-signature": mac, "x-timestamp": stamp, "content-type": "application/json"}
    return await client.post("/webhooks/vapi", content=body, headers=headers)


def cookie(value: str) -> dict[str, str]:
    """The session cookie as a browser sends it (httpx's per-request cookies are deprecated)."""
    return {"cookie": f"{session.COOKIE}={value}"}


def check_headers(answer: httpx.Response) -> None:
    where = f"{answer.request.method} {answer.request.url} -> {answer.status_code}"
    csp = answer.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, where
    assert "default-src 'none'" in csp, where  # and no script-src: no script at all
    assert "script-src" not in csp, where
    assert "unsafe-inline" not in csp, where
    assert answer.headers.get("x-content-type-options") == "nosniff", where
    assert answer.headers.get("referrer-policy") == "same-origin", where


async def sign_in(client: httpx.AsyncClient, token: str = TOKEN, next_path: str = "/ui/") -> httpx.Response:
    return await client.post(
        "/ui/login",
        content=f"token={token}&next={next_path}",
        headers={"content-type": "application/x-www-form-urlencoded", "origin": "http://transcriptd.test"},
    )


async def test_the_list_shows_conversations_newest_first_with_their_fields_and_filters(app_client: AppClient) -> None:
    async with app_client() as client:
        events = [
            envelope("c-old", "system.replica_joined", {"replica_id": "r-1"}),
            transcription_ready("c-mid", turns=4),  # the end of a call: it ends the conversation
            envelope("c-new", "system.replica_joined", {"replica_id": "r-2"}),
        ]
        for event in events:
            assert (await client.post("/webhooks/tavus", content=encode(event))).status_code == 200
        page = await client.get("/ui/")
        only_active = await client.get("/ui/?status=active&source=tavus")
        only_ended = await client.get("/ui/", params={"status": "ended", "source": "", "key": "", "value": ""})
        paged = await client.get("/ui/?limit=2")
        following = re.search(r'rel="next" href="([^"]+)"', paged.text)
        assert following is not None
        second = await client.get(html.unescape(following.group(1)))
    assert page.status_code == 200
    check_headers(page)
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert '<html lang="en">' in page.text
    assert "<title>Conversations · transcriptd</title>" in page.text
    ids = re.findall(r'href="/ui/conversations/([^"]+)"', page.text)
    assert ids == ["c-new", "c-mid", "c-old"]
    assert "tavus" in page.text
    assert ">ended<" in page.text
    assert ">active<" in page.text
    assert re.findall(r'data-label="Messages" class="number">(\d+)<', page.text) == ["0", "5", "0"]
    assert re.findall(r'href="/ui/conversations/([^"]+)"', only_active.text) == ["c-new", "c-old"]
    assert re.findall(r'href="/ui/conversations/([^"]+)"', only_ended.text) == ["c-mid"]
    assert re.findall(r'href="/ui/conversations/([^"]+)"', paged.text) == ["c-new", "c-mid"]
    assert re.findall(r'href="/ui/conversations/([^"]+)"', second.text) == ["c-old"]


async def test_the_list_filters_by_a_metadata_key(app_client: AppClient) -> None:
    async with app_client() as client:
        for cid, team in (("c-sales", "sales"), ("c-care", "care")):
            answer = await client.post(
                f"/webhooks/tavus?team={team}", content=encode(transcription_ready(cid, turns=1))
            )
            assert answer.status_code == 200
        care = await client.get("/ui/", params={"key": "team", "value": "care"})
        bad_key = await client.get("/ui/", params={"key": "no spaces allowed", "value": "x"})
        value_alone = await client.get("/ui/", params={"value": "care"})
    assert re.findall(r'href="/ui/conversations/([^"]+)"', care.text) == ["c-care"]
    assert 'value="team"' in care.text  # the form keeps what was asked
    assert bad_key.status_code == 422
    assert "metadata key" in bad_key.text
    assert value_alone.status_code == 422
    assert "needs its key" in value_alone.text


async def test_a_conversation_shows_its_messages_in_order_with_anchors_and_the_prompt_collapsed(
    app_client: AppClient,
) -> None:
    body = transcription_ready("c-chat", turns=6)
    said = [entry["content"] for entry in body["properties"]["transcript"][1:]]
    events = [
        envelope(
            "c-chat",
            "application.recording_ready",
            {"storage_provider": "s3", "storage_uri": "https://r.example/a.mp4"},
        ),
        envelope("c-chat", "system.shutdown", {"shutdown_reason": "participant_left"}),
    ]
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(body))).status_code == 200
        for event in events:
            assert (await client.post("/webhooks/tavus", content=encode(event))).status_code == 200
        page = await client.get("/ui/conversations/c-chat")
    assert page.status_code == 200, page.text
    check_headers(page)
    anchors = re.findall(r'<li id="m-(\d+)" class="message role-(\w+)">', page.text)
    assert anchors == [("0", "system"), *((str(i), "user" if i % 2 else "assistant") for i in range(1, 7))]
    texts = [html.unescape(t) for t in re.findall(r'<p class="text">(.*?)</p>', page.text, re.S)]
    assert texts == [SYSTEM_PROMPT, *said]
    assert '<details class="system">\n      <summary>System prompt</summary>' in page.text  # collapsed: no `open`
    assert '<a href="https://r.example/a.mp4" rel="noopener noreferrer">Listen to the recording</a>' in page.text
    assert "participant_left" in page.text
    assert 'href="/ui/conversations/c-chat/events"' in page.text


async def test_hostile_text_is_escaped_everywhere_it_shows(app_client: AppClient) -> None:
    cid = '<b>"c-x"</b>&'
    recording = envelope(
        cid, "application.recording_ready", {"storage_provider": "s3", "storage_uri": "javascript:alert(1)"}
    )
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(hostile_call(cid)))).status_code == 200
        assert (await client.post("/webhooks/tavus", content=encode(recording))).status_code == 200
        listed = await client.get("/ui/")
        page = await client.get(f"/ui/conversations/{quoted(cid)}")
        found = await client.get("/ui/search", params={"q": "script alert"})
    for answer in (listed, page, found):
        assert answer.status_code == 200, answer.text
        assert "<script>" not in answer.text
        assert "<b>" not in answer.text
        assert "<img" not in answer.text
        assert 'onerror="alert' not in answer.text
    assert str(escape(HOSTILE)) in page.text
    assert str(escape(cid)) in listed.text
    assert 'href="javascript:' not in page.text
    assert "<code>javascript:alert(1)</code>" in page.text
    # The search snippet: its <mark> is ours, the transcript's angle brackets escaped around it.
    assert "&lt;<mark>script</mark>&gt;<mark>alert</mark>" in found.text


async def test_tool_calls_analysis_and_end_reason_of_a_vapi_call(app_client: AppClient) -> None:
    report = json.loads(VAPI_REPORT.read_bytes())
    async with app_client(**{"webhooks.vapi.hmac_secret": VAPI_SECRET}) as client:
        assert (await post_vapi(client, report)).status_code == 200
        page = await client.get("/ui/conversations/schema-call-with-tools")
    assert page.status_code == 200, page.text
    assert page.text.count('class="message role-tool"') >= 2
    assert re.search(r'<details class="tool" open>\s*<summary>Tool tool_calls</summary>', page.text)
    assert "The caller asked for the weather in Lisbon" in page.text  # the analysis
    assert "customer-ended-call" in page.text


async def test_the_raw_events_are_one_click_away_and_masked(app_client: AppClient) -> None:
    async with app_client() as client:
        assert (
            await client.post("/webhooks/tavus", content=encode(transcription_ready("c-raw", turns=2)))
        ).status_code == 200
        conversation = await client.get("/ui/conversations/c-raw")
        timeline = await client.get("/ui/conversations/c-raw/events")
        link = re.search(r'href="(/ui/conversations/c-raw/events/event/\d+)"', timeline.text)
        assert link is not None
        body = await client.get(link.group(1))
        missing = await client.get("/ui/conversations/c-raw/events/event/999999")
        wrong_kind = await client.get("/ui/conversations/c-raw/events/other/1")
        other_conversation = await client.get(link.group(1).replace("c-raw", "c-none"))
    assert 'href="/ui/conversations/c-raw/events"' in conversation.text
    check_headers(timeline)
    assert "application.transcription_ready" in timeline.text
    assert "stored" in timeline.text
    assert body.status_code == 200
    assert "r79e1c033f" in body.text  # the body itself, indented
    assert CALLBACK_TOKEN not in body.text
    assert "[redacted]" in body.text
    assert missing.status_code == wrong_kind.status_code == other_conversation.status_code == 404


async def test_search_links_each_hit_to_its_message(app_client: AppClient) -> None:
    body = transcription_ready("c-find", turns=4)
    body["properties"]["transcript"][3]["content"] = "I would like a full refund for the réservation please"
    async with app_client() as client:
        assert (await client.post("/webhooks/tavus", content=encode(body))).status_code == 200
        form = await client.get("/ui/search")
        phrase = await client.get("/ui/search", params={"q": '"full refund"', "role": "user"})
        accents = await client.get("/ui/search", params={"q": "reservation"})
        wrong_role = await client.get("/ui/search", params={"q": '"full refund"', "role": "assistant"})
        bad = await client.get("/ui/search", params={"q": '"unclosed'})
        unknown = await client.get("/ui/search", params={"q": "x", "colour": "red"})
    assert form.status_code == 200
    assert '<input id="q" name="q" type="search" value="" required>' in form.text
    check_headers(phrase)
    assert 'href="/ui/conversations/c-find?source=tavus#m-3"' in phrase.text
    assert "<mark>full refund</mark>" in phrase.text
    assert 'href="/ui/conversations/c-find?source=tavus#m-3"' in accents.text
    assert "<mark>réservation</mark>" in accents.text
    assert "No message matches." in wrong_role.text
    assert bad.status_code == 422
    assert "is not closed" in bad.text
    check_headers(bad)
    assert unknown.status_code == 422


async def test_errors_are_pages_with_the_right_status(app_client: AppClient) -> None:
    async with app_client() as client:
        missing = await client.get("/ui/conversations/nobody")
        no_events = await client.get("/ui/conversations/nobody/events")
        not_utf8 = await client.get("/ui/conversations/%FF")
        bad_status = await client.get("/ui/?status=sleeping")
        bad_cursor = await client.get("/ui/?cursor=not-a-cursor")
        unknown = await client.get("/ui/conversations/nobody?colour=red")
        post = await client.post("/ui/")
    for answer, status in (
        (missing, 404),
        (no_events, 404),
        (not_utf8, 400),
        (bad_status, 422),
        (bad_cursor, 422),
        (unknown, 404),
    ):
        assert answer.status_code == status, (answer.request.url, answer.text)
        assert answer.headers["content-type"].startswith("text/html")
        check_headers(answer)
    assert "no conversation &#39;nobody&#39;" in missing.text
    assert "status" in bad_status.text
    assert post.status_code == 405


async def test_root_leads_a_browser_to_the_viewer_and_the_stylesheet_is_served(app_client: AppClient) -> None:
    async with app_client(**{"api.token": TOKEN}) as client:
        root = await client.get("/")
        css = await client.get("/ui/static/viewer.css")
    assert root.status_code == 303
    assert root.headers["location"] == "/ui/"
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "@media (max-width: 40rem)" in css.text  # the phone layout
    check_headers(css)


@pytest.mark.parametrize("path", PAGES)
async def test_with_a_token_no_page_opens_without_signing_in(app_client: AppClient, path: str) -> None:
    async with app_client(**{"api.token": TOKEN}) as client:
        # Tavus' endpoint takes deliveries without api.token (it has a token of its own, not set here).
        assert (await client.post("/webhooks/tavus", content=encode(hostile_call("c-1")))).status_code == 200
        refused = await client.get(path)
        wrong_bearer = await client.get(path, headers={"authorization": "Bearer nope"})
        forged = await client.get(path, headers=cookie(f"{int(time.time()) + 3600}.{'0' * 64}"))
        garbled = await client.get(path, headers=cookie("x.y.z"))
    for answer in (refused, wrong_bearer, forged, garbled):
        assert answer.status_code == 401, path
        check_headers(answer)
        assert '<form class="login" method="post" action="/ui/login">' in answer.text
        # Nothing of the call: not its transcript, not its source, not the raw body.
        for word in ("alert", "appointment", "Tuesday", "tavus", "r79e1c033f"):
            assert word not in answer.text, (path, word)


async def test_signing_in_sets_a_strict_httponly_cookie_that_opens_every_page(app_client: AppClient) -> None:
    async with app_client(**{"api.token": TOKEN}) as client:
        assert (await client.post("/webhooks/tavus", content=encode(hostile_call("c-1")))).status_code == 200
        form = await client.get("/ui/login?next=/ui/conversations/c-1")
        wrong = await sign_in(client, "not-the-token")
        assert session.COOKIE not in client.cookies
        answer = await sign_in(client, next_path="/ui/conversations/c-1")
        opened = {path: (await client.get(path)).status_code for path in PAGES}
        signed_out = await client.post("/ui/logout", headers={"origin": "http://transcriptd.test"})
        after = await client.get("/ui/")
        by_bearer = await client.get("/ui/", headers={"authorization": f"Bearer {TOKEN}"})
    assert form.status_code == 200
    assert 'name="next" value="/ui/conversations/c-1"' in form.text
    assert wrong.status_code == 401
    assert "That is not the token." in wrong.text
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/conversations/c-1"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{session.COOKIE}=")
    for flag in ("HttpOnly", "Path=/ui", "SameSite=strict", f"Max-Age={session.SESSION_S}"):
        assert flag.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain HTTP here: a Secure cookie would never come back
    assert TOKEN not in cookie
    assert TOKEN not in answer.headers["location"]
    assert opened == dict.fromkeys(PAGES, 200)
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/ui/login"
    assert after.status_code == 401
    assert by_bearer.status_code == 200  # scripts may send the token as the JSON API takes it


async def test_a_sign_in_posted_from_another_site_is_refused(app_client: AppClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with app_client(**{"api.token": TOKEN}) as client:
        other_origin = await client.post(
            "/ui/login", content=f"token={TOKEN}", headers=form | {"origin": "https://evil.example"}
        )
        other_site = await client.post(
            "/ui/login", content=f"token={TOKEN}", headers=form | {"sec-fetch-site": "cross-site"}
        )
        too_big = await client.post("/ui/login", content=b"token=" + b"x" * 10_000, headers=form)
        away = await sign_in(client, next_path="//evil.example/")
        elsewhere = await sign_in(client, next_path="https://evil.example/ui/")
    assert other_origin.status_code == other_site.status_code == 403
    assert "set-cookie" not in other_origin.headers
    assert "set-cookie" not in other_site.headers
    assert too_big.status_code == 413
    assert away.headers["location"] == elsewhere.headers["location"] == "/ui/"


async def test_an_expired_cookie_is_refused(app_client: AppClient) -> None:
    async with app_client(**{"api.token": TOKEN}) as client:
        stale = session.issue(TOKEN, time.time() - session.SESSION_S - 1)
        fresh = session.issue(TOKEN, time.time())
        other_token = session.issue("another-token", time.time())
        refused = await client.get("/ui/", headers=cookie(stale))
        opened = await client.get("/ui/", headers=cookie(fresh))
        mixed = await client.get("/ui/", headers=cookie(other_token))
    assert refused.status_code == 401
    assert mixed.status_code == 401
    assert opened.status_code == 200


async def test_without_a_token_the_pages_are_open_and_sign_in_leads_to_them(app_client: AppClient) -> None:
    async with app_client() as client:
        page = await client.get("/ui/")
        login = await client.get("/ui/login")
    assert page.status_code == 200
    assert "Sign out" not in page.text
    assert login.status_code == 303
    assert login.headers["location"] == "/ui/"
