"""The dashboard in a real headless Chromium, driven by Playwright, against a real system.

Playwright cannot download its own browser on these machines: it drives the system's Chromium.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import wait_for
from playwright.async_api import Browser, Page, async_playwright, expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_dashboard(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """The page, and a list that collects its JavaScript errors."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url + "/")
    await expect(page.locator("#connection")).to_have_text("live")
    return page, errors


async def test_card_turns_down_and_a_404_shows_in_counter_and_table(
    make_config, start_system, outside_backend, browser, http
) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}, {"name": "outside", "url": outside.url}]))
    page, errors = await open_dashboard(browser, system.balancer_url)

    card = page.locator('[data-backend="outside"]')
    await expect(card).to_have_attribute("data-state", "up")
    await expect(card.locator(".state")).to_have_text("up")
    await expect(card).to_contain_text(outside.url)
    counter = page.locator('[data-error-type="404_NOT_FOUND"] .count')
    await expect(counter).to_have_text("0")

    await outside.stop()
    await expect(card).to_have_attribute("data-state", "down", timeout=5000)
    await expect(card.locator(".state")).to_have_text("down")
    await expect(card.locator(".last-check")).to_contain_text("connection refused")
    await expect(page.locator("#health")).to_have_text("degraded")

    async with http.get(system.balancer_url + "/tasks/4040404", headers={"X-Request-ID": "browser-404"}) as response:
        assert response.status == 404
    await expect(counter).to_have_text("1", timeout=5000)
    row = page.locator('#recent-errors tr[data-request-id="browser-404"]')
    await expect(row).to_contain_text("/tasks/4040404")
    await expect(row).to_contain_text("Task 4040404 not found")
    await expect(row.locator(".status")).to_have_text("404")
    await expect(page.locator('[data-backend="backend-1"] .requests')).to_have_text("1")
    assert errors == []


async def test_page_reconnects_by_itself_when_the_balancer_restarts(make_config, start_system, browser, http) -> None:
    first = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}]))
    port = int(first.balancer_url.rsplit(":", 1)[1])
    page, errors = await open_dashboard(browser, first.balancer_url)
    async with http.get(first.balancer_url + "/tasks/777") as response:
        assert response.status == 404
    counter = page.locator('[data-error-type="404_NOT_FOUND"] .count')
    await expect(counter).to_have_text("1", timeout=5000)

    await first.stop()
    await expect(page.locator("#connection")).to_have_text("reconnecting…", timeout=5000)
    second = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}], balancer={"port": port}))
    await wait_for(lambda: second.balancer_url.endswith(f":{port}"), message="the same port")
    # A new process, a new tracker: the page shows the new balancer's counts without a reload.
    await expect(page.locator("#connection")).to_have_text("live", timeout=10000)
    await expect(counter).to_have_text("0", timeout=5000)
    assert errors == []
