"""The studio end to end in a real browser (Debian's Chromium via Playwright) on the embedded model and the demo data:
prepare, train (watch it, close the tab, open a second one), stop and resume, runs, sweep, chat with the best trial,
publish with a canary token, navigation while training. Screenshots of every page go to docs/studio/ (the README shows
them). Slow: real training of the 135M model on this machine's cores."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.test_app_browser import IDLE, browser, require_browser, serve  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "studio"
REQUESTS: list[str] = []
NAV_LIMIT_S = 2.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("studio") / "runs"


@pytest.fixture(scope="module")
def studio(browser, runs, tmp_path_factory):  # noqa: F811
    runs.mkdir(parents=True, exist_ok=True)
    with serve(tmp_path_factory, "--runs-dir", str(runs)) as url:
        yield url


def open_studio(browser, url: str):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("request", lambda request: REQUESTS.append(request.url))
    page.goto(url)
    page.locator(IDLE).wait_for()
    return page


def go(page, title: str) -> float:
    """Click `title` in the sidebar navigation; seconds until the page's heading is shown and its script is done."""
    started = time.monotonic()
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
    page.locator("h1", has_text=title).first.wait_for()
    page.locator(IDLE).wait_for()
    return time.monotonic() - started


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(IDLE).wait_for()
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_every_page_opens_from_the_navigation(browser, studio):  # noqa: F811
    page = open_studio(browser, studio)
    for title in ("Data", "Train", "Runs", "Sweep", "Publish"):
        assert go(page, title) < 10
    page.context.close()


def test_the_studio_asks_nothing_of_any_host_but_this_one(browser, studio):  # noqa: F811
    page = open_studio(browser, studio)
    go(page, "Train")
    loaded = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    icons = page.evaluate("[...document.querySelectorAll('link[rel*=icon]')].map(l => l.href)")
    page.context.close()
    urls = REQUESTS + loaded + icons
    assert len(REQUESTS) > 10 and icons
    outside = sorted({u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
                      and urlparse(u).hostname != "127.0.0.1"})
    assert not outside, outside
