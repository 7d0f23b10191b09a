"""The viewer in a real browser: Debian's Chromium driven by Playwright, against ``transcriptd serve`` in a
subprocess with ``api.token`` set, fed real webhook deliveries over loopback.

Chromium must be installed (``.ci/run`` installs it): without it these tests fail, they do not skip. Each test
saves a screenshot of every page it opens into its ``tmp_path``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, Playwright, ViewportSize, sync_playwright

from tests.daemon_process import Daemon, managed, start_daemon
from tests.payloads import encode, transcription_ready

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "read-s3cret"  # api.token, from TEST_SECRETS
HOSTILE = '<script>window.pwned = 1; alert("x")</script><img src=x onerror="window.pwned = 2; alert(1)"> & done'
PHONE: ViewportSize = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("viewer-daemon")
    with managed(start_daemon(workdir, workdir / "transcriptd.db", env={"TRANSCRIPTD_API_TOKEN": TOKEN})) as running:
        yield running


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Playwright's own browser download does not work on these machines: the system's Chromium, or a failure.
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install the chromium package (.ci/run does)"
    launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    yield launched
    launched.close()


@pytest.fixture
def context(browser: Browser, daemon: Daemon) -> Iterator[BrowserContext]:
    opened = browser.new_context(base_url=daemon.base_url)
    yield opened
    opened.close()


class Shots:
    """Screenshots of every page a test opens, numbered in order, in its tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.taken: list[Path] = []

    def __call__(self, page: Page, name: str) -> None:
        path = self.directory / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000, path  # an image of something, not an empty file
        self.taken.append(path)


def deliver(daemon: Daemon, body: dict[str, object]) -> None:
    answer = httpx.post(f"{daemon.base_url}/webhooks/tavus", content=encode(body), timeout=10)
    assert answer.status_code == 200, answer.text


def sign_in(page: Page, token: str = TOKEN) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_a_reader_signs_in_reads_a_conversation_and_lands_on_a_search_hit(
    daemon: Daemon, context: BrowserContext, tmp_path: Path
) -> None:
    shot = Shots(tmp_path)
    call = transcription_ready("c-browse", turns=6)
    call["properties"]["transcript"][3]["content"] = "Could I get a full refund for the réservation on Tuesday?"
    said = [entry["content"] for entry in call["properties"]["transcript"][1:]]
    deliver(daemon, call)
    page = context.new_page()

    refused = page.goto("/ui/conversations/c-browse")
    assert refused is not None
    assert refused.status == 401
    assert "Tuesday" not in page.content()
    shot(page, "sign-in")
    sign_in(page, "not-the-token")
    assert page.get_by_role("alert").inner_text() == "That is not the token."
    sign_in(page)
    # Back to the page that asked for the sign-in.
    page.wait_for_url(re.compile(r"/ui/conversations/c-browse$"))
    assert [c["name"] for c in context.cookies()] == ["transcriptd_ui"]
    assert context.cookies()[0]["httpOnly"] is True
    assert context.cookies()[0]["sameSite"] == "Strict"

    page.goto("/ui/")
    assert page.title() == "Conversations · transcriptd"
    row = page.locator("table.conversations tbody tr", has_text="c-browse")
    assert row.locator('[data-label="Status"]').inner_text() == "ended"
    assert row.locator('[data-label="Messages"]').inner_text() == "7"
    shot(page, "conversations")

    page.get_by_role("link", name="c-browse").click()
    page.wait_for_url(re.compile(r"/ui/conversations/c-browse$"))
    assert page.get_by_role("heading", level=1).inner_text() == "Conversation c-browse"
    spoken = page.locator("ol.transcript li.message:not(.role-system) p.text").all_inner_texts()
    assert spoken == said
    prompt = page.locator("details.system")
    assert prompt.get_attribute("open") is None
    assert not prompt.locator("p.text").is_visible()  # collapsed until asked for
    shot(page, "conversation")
    prompt.locator("summary").click()
    assert prompt.locator("p.text").is_visible()

    page.get_by_role("link", name="Raw events (the delivery timeline)").click()
    assert page.locator("table.events tbody tr").count() == 1
    shot(page, "events")
    page.get_by_role("link", name=re.compile(r"^Body of application\.transcription_ready")).click()
    assert '"event_type": "application.transcription_ready"' in page.locator("pre.body").inner_text()
    shot(page, "event-body")

    page.get_by_role("link", name="Search").click()
    page.get_by_label('Words, "phrases", prefix* or -exclusions').fill('"full refund" reservation')
    page.get_by_role("button", name="Search").click()
    hits = page.locator("ol.hits li")
    assert hits.count() == 1
    assert hits.locator("mark").all_inner_texts() == ["full refund", "réservation"]
    shot(page, "search")
    hits.get_by_role("link", name="c-browse").click()
    page.wait_for_url(re.compile(r"/ui/conversations/c-browse\?source=tavus#m-3$"))
    target = page.locator("li.message:target")
    assert target.get_attribute("id") == "m-3"
    assert target.locator("p.text").inner_text() == said[2]
    assert target.is_visible()
    shot(page, "search-hit")

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/ui/login$"))
    again = page.goto("/ui/")
    assert again is not None
    assert again.status == 401
    assert len(shot.taken) == 7


def test_hostile_text_stays_text_in_the_browser(daemon: Daemon, context: BrowserContext, tmp_path: Path) -> None:
    shot = Shots(tmp_path)
    call = transcription_ready("c-hostile", turns=2)
    call["properties"]["transcript"][1]["content"] = HOSTILE
    deliver(daemon, call)
    dialogs: list[str] = []

    def dismissed(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page = context.new_page()
    page.on("dialog", dismissed)
    page.goto("/ui/")
    sign_in(page)
    for path in ("/ui/conversations/c-hostile", "/ui/search?q=pwned"):
        page.goto(path)
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.locator("main script, main img").count() == 0
        shot(page, path.rsplit("/", 1)[-1].split("?")[0])
    page.goto("/ui/conversations/c-hostile")
    assert page.locator("#m-1 p.text").inner_text() == HOSTILE  # shown literally, every character
    page.goto("/ui/search?q=pwned")
    assert "<script>window.pwned" in page.locator("ol.hits li p").first.inner_text()
    assert dialogs == []


def test_the_token_guards_every_page_in_the_browser(daemon: Daemon, context: BrowserContext, tmp_path: Path) -> None:
    shot = Shots(tmp_path)
    deliver(daemon, transcription_ready("c-guarded", turns=2))
    page = context.new_page()
    for path in (
        "/ui/",
        "/ui/conversations/c-guarded",
        "/ui/conversations/c-guarded/events",
        "/ui/conversations/c-guarded/events/event/1",
        "/ui/search?q=hello",
    ):
        answer = page.goto(path)
        assert answer is not None
        assert answer.status == 401, path
        assert page.get_by_label("API token").is_visible()
        assert page.locator("main table, main ol").count() == 0
        shot(page, "refused")
    assert context.cookies() == []


def test_the_pages_fit_a_phone(browser: Browser, daemon: Daemon, tmp_path: Path) -> None:
    shot = Shots(tmp_path)
    deliver(daemon, transcription_ready("c-phone", turns=8, content_chars=600))
    phone = browser.new_context(base_url=daemon.base_url, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page = phone.new_page()
        page.goto("/ui/")
        sign_in(page)
        for path in ("/ui/", "/ui/conversations/c-phone", "/ui/conversations/c-phone/events", "/ui/search?q=hello"):
            page.goto(path)
            # Nothing wider than the screen: no sideways scrolling to read a transcript.
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
            shot(page, "phone")
        page.goto("/ui/")
        # The table turned into one card per conversation, each cell labelled.
        label = page.locator('table.conversations tbody tr [data-label="Status"]').first
        assert label.evaluate("element => getComputedStyle(element, '::before').content") == '"Status"'
    finally:
        phone.close()
