"""The dashboard in a real headless Chromium, driven by Playwright, against a real system.

Playwright cannot download its own browser on these machines: it drives the system's Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Locator, Page, async_playwright, expect
from support.clock import FakeClock
from support.waiting import wait_for

from lb_system.observability.dashboard import make_page_handler

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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


TOKEN = "dashboard-test-token"
WATCH = 0.05  # seconds between polls of the config file


async def open_dashboard(browser: Browser, url: str, width: int = 1280) -> tuple[Page, list[str]]:
    """The page, and a list that collects its JavaScript errors."""
    page = await browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url + "/")
    await expect(page.locator("body")).to_have_attribute("data-feed", "live")
    await expect(page.locator("#connection")).to_have_text("live")
    return page, errors


def card(page: Page, name: str) -> Locator:
    return page.locator(f'[data-backend="{name}"]')


async def expect_state(page: Page, name: str, state: str) -> None:
    await expect(card(page, name)).to_have_attribute("data-state", state, timeout=5000)
    await expect(card(page, name).locator(".state")).to_have_text(state)


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
    backend_1 = page.locator('[data-backend="backend-1"]')
    await expect(backend_1.locator(".requests")).to_have_text("1")
    # The 404 is the client's mistake: it shows as a client error, not against the backend's health.
    await expect(backend_1.locator(".client-errors")).to_have_text("100.0 %")
    await expect(backend_1.locator(".server-errors")).to_have_text("0.0 %")
    assert errors == []


async def test_page_says_when_its_feed_is_lost_and_recovers_when_the_balancer_returns(
    make_config, start_system, browser, http
) -> None:
    first = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}]))
    port = int(first.balancer_url.rsplit(":", 1)[1])
    page, errors = await open_dashboard(browser, first.balancer_url)
    body, banner = page.locator("body"), page.locator("#feed-lost")
    await expect(banner).to_be_hidden()
    async with http.get(first.balancer_url + "/tasks/777") as response:
        assert response.status == 404
    counter = page.locator('[data-error-type="404_NOT_FOUND"] .count')
    await expect(counter).to_have_text("1", timeout=5000)

    await first.stop()
    # Within about 2 s: the page no longer passes the last data off as live.
    await expect(body).to_have_attribute("data-feed", "lost", timeout=3000)
    await expect(banner).to_be_visible()
    await expect(banner).to_have_text(re.compile(r"connection lost at \d\d:\d\d:\d\d; showing the last data"))
    assert "grayscale(1)" in await page.locator("main").evaluate("node => getComputedStyle(node).filter")
    await expect(counter).to_have_text("1")  # the last data stays

    second = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}], balancer={"port": port}))
    await wait_for(lambda: second.balancer_url.endswith(f":{port}"), message="the same port")
    # A new process, a new tracker: the page shows the new balancer's counts without a reload.
    await expect(body).to_have_attribute("data-feed", "live", timeout=10000)
    await expect(banner).to_be_hidden()
    await expect(counter).to_have_text("0", timeout=5000)
    assert await page.locator("main").evaluate("node => getComputedStyle(node).filter") == "none"
    assert errors == []


class StalledFeed:
    """The dashboard page, and an event stream that sends one snapshot and then nothing, without
    closing (a dead network path); the streams opened after the first work again."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.opened = 0
        self.done = asyncio.Event()
        self.server: TestServer | None = None

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.opened += 1
        stalled = self.opened == 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        event = "snapshot"
        while not self.done.is_set():
            await response.write(f"event: {event}\ndata: {json.dumps(self.snapshot)}\n\n".encode())
            event = "update"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), None if stalled else self.snapshot["interval_s"])
        return response

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/", make_page_handler())
        app.router.add_get("/events", self.events)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return f"http://127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        self.done.set()  # open streams end instead of holding the server's close
        if self.server is not None:
            await self.server.close()


async def test_page_notices_a_feed_that_stalls_without_closing_and_opens_a_new_one(
    make_config, start_system, browser, http
) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/events") as response:
        while not (line := await response.content.readline()).startswith(b"data:"):
            pass
    feed = StalledFeed(json.loads(line[5:]) | {"interval_s": 0.25})
    try:
        page, errors = await open_dashboard(browser, await feed.start())
        # No error event ever comes: the page's own watchdog sees two ticks go by without a message.
        await expect(page.locator("body")).to_have_attribute("data-feed", "lost", timeout=3000)
        await expect(page.locator("#feed-lost")).to_contain_text("showing the last data")
        await wait_for(lambda: feed.opened >= 2, message="the page to open a new stream by itself")
        await expect(page.locator("body")).to_have_attribute("data-feed", "live", timeout=3000)
        await expect(page.locator("#feed-lost")).to_be_hidden()
        assert errors == []
    finally:
        await feed.stop()


async def test_cards_show_admin_states_and_retiring_and_a_banner_shows_the_refused_config(
    config_file, start_system, gated_backend, browser, http, monkeypatch
) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    gated = await gated_backend("remote")
    hosted = [{"name": f"backend-{i}", "port": 0} for i in (1, 2, 3)]
    config_file.write(backends=[{"name": "remote", "url": gated.url}, *hosted])
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    system.balancer.live_feed.interval = 0.25  # six changes to watch: not a second each
    page, errors = await open_dashboard(browser, system.balancer_url)
    for name in ("remote", "backend-1", "backend-2", "backend-3"):
        await expect_state(page, name, "up")
    await expect(page.locator("#config-error")).to_be_hidden()

    # A request held on remote, then a reload removes remote: it retires once the request ends.
    slow: list[asyncio.Task[aiohttp.ClientResponse]] = []
    while not gated.active:
        slow.append(asyncio.create_task(http.get(system.balancer_url + "/slow")))
        await wait_for(lambda: gated.active or slow[-1].done(), message="a /slow request answered or held")
    config_file.write(backends=hosted)
    await expect_state(page, "remote", "retiring")

    actions = [("disable", "backend-1", "disabled"), ("drain", "backend-2", "draining"), ("stop", "backend-3", "stopped")]
    for action, name, state in actions:
        url = f"{system.balancer_url}/admin/backends/{name}/{action}"
        async with http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
        await expect_state(page, name, state)
    assert await page.locator('[data-state="up"]').count() == 0  # none of them shows as a green UP

    config_file.write_text(config_file.path.read_text() + "[errors]\nrecent = 0\n")
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    banner = page.locator("#config-error")
    await expect(banner).to_be_visible(timeout=5000)
    await expect(banner).to_contain_text(system.config_error)

    gated.release.set()
    for task in slow:
        (await task).release()
    await expect(card(page, "remote")).to_have_count(0, timeout=5000)
    assert errors == []


# Words split across lines although their box could hold them whole. Paths, ids and URLs may
# break anywhere; a word wider than its whole box (a client's long id in a detail) has to.
WORDS_BROKEN_ACROSS_LINES = """() => {
  const broken = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, parent = node.parentElement;
    if (parent.closest(".path, .request-id, .url, code, script, style")) continue;
    for (const match of node.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, match.index);
      range.setEnd(node, match.index + match[0].length);
      const lines = new Set([...range.getClientRects()].map((rect) => Math.round(rect.top)));
      if (lines.size < 2) continue;
      const probe = document.createElement("span");
      probe.style.cssText = "position:absolute;visibility:hidden;white-space:nowrap";
      probe.textContent = match[0];
      parent.append(probe);
      const width = probe.getBoundingClientRect().width;
      probe.remove();
      const style = getComputedStyle(parent);
      if (width <= parent.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) broken.push(match[0]);
    }
  }
  return broken;
}"""


async def test_page_fits_a_360_px_window_and_every_figure_says_its_window(make_config, start_system, browser, http) -> None:
    system = await start_system(make_config())
    long_path = "/tasks/" + "a-path-segment-far-too-long-for-a-phone-screen" * 2
    for request_id in ("short-1", "a-rather-long-request-id-0123456789abcdef-0123456789abcdef"):
        async with http.get(system.balancer_url + long_path, headers={"X-Request-ID": request_id}) as response:
            assert response.status == 404
    page, errors = await open_dashboard(browser, system.balancer_url, width=360)
    await expect(page.locator("#recent-errors tr[data-request-id]")).to_have_count(2)

    assert await page.evaluate("document.documentElement.scrollWidth") <= await page.evaluate("window.innerWidth")
    assert await page.evaluate(WORDS_BROKEN_ACROSS_LINES) == []

    # Every figure names its window: in a caption beside it and in its tooltip.
    figures = page.locator("[data-figure]")
    assert await figures.count() >= 2 * 7 + 3
    titles = await figures.evaluate_all("nodes => nodes.map((node) => node.title)")
    assert all(re.search(r"\b(since|last|latest|now)\b", title) for title in titles), titles
    assert await page.locator(".card dd:not([data-figure])").count() == 0
    backend = card(page, "backend-1")
    for caption in ("total since start", "now", "last 1000 tries", "no answer or 5xx, last 1 min", "4xx, last 1 min"):
        await expect(backend.locator(".caption", has_text=caption)).to_have_count(1)
    await expect(page.locator("#chart-caption")).to_contain_text("the last 5 min")
    await expect(page.locator("#errors-since")).to_contain_text("since")
    await expect(page.locator("#recent-caption")).to_contain_text("the last 20")
    assert errors == []


async def test_with_two_pools_the_cards_are_grouped_by_pool_with_each_pools_health(
    make_config, start_system, outside_backend, browser
) -> None:
    api, web = await outside_backend("api-1"), await outside_backend("web-1")
    config = make_config(
        backends=[{"name": "api-1", "url": api.url, "pool": "api"}, {"name": "web-1", "url": web.url}],
        routes=[{"path_prefix": "/api", "pool": "api"}],
        pools={"api": {"strategy": "least_connections"}},
    )
    system = await start_system(config)
    page, errors = await open_dashboard(browser, system.balancer_url)
    api_group, default_group = page.locator('section[data-pool="api"]'), page.locator('section[data-pool="default"]')
    await expect(api_group.locator('[data-backend="api-1"]')).to_have_attribute("data-state", "up")
    await expect(default_group.locator('[data-backend="web-1"]')).to_have_attribute("data-state", "up")
    await expect(api_group.locator(".pool-status")).to_have_text("ok")
    await expect(api_group.locator("h3")).to_contain_text("1 of 1 serving, least_connections")

    await api.stop()
    await expect(api_group).to_have_attribute("data-status", "unavailable", timeout=5000)
    await expect(api_group.locator(".pool-status")).to_have_text("unavailable")
    await expect(default_group.locator(".pool-status")).to_have_text("ok")
    await expect(page.locator("#health")).to_have_text("degraded")
    assert errors == []


async def test_cards_mark_a_backup_and_a_backend_in_its_slow_start(make_config, start_system, outside_backend, browser) -> None:
    clock = FakeClock()
    one, spare = await outside_backend("one"), await outside_backend("spare")
    config = make_config(
        backends=[{"name": "one", "url": one.url, "weight": 4}, {"name": "spare", "url": spare.url, "backup": True}],
        health={"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1, "slow_start": 60},
    )
    system = await start_system(config, clock=clock)
    page, errors = await open_dashboard(browser, system.balancer_url)
    await expect(card(page, "spare").locator(".badge.backup")).to_have_text("backup")
    await expect(card(page, "one").locator(".badge.backup")).to_have_count(0)
    await expect(card(page, "one").locator(".ramp")).to_have_count(0)

    await one.stop()
    await expect_state(page, "one", "down")
    await one.start()
    await expect_state(page, "one", "up")
    await expect(card(page, "one").locator(".ramp")).to_have_text("slow start: weight 0.4 of 4")
    clock.advance(60)
    await expect(card(page, "one").locator(".ramp")).to_have_count(0, timeout=5000)
    assert errors == []
