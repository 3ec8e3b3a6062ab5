"""Regenerate docs/dashboard.png: a real system with traffic and errors, shot in headless Chromium.

Usage: python docs/make_dashboard_screenshot.py [--seconds 90] [--width 1280] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb_system import System, parse_config  # noqa: E402
from lb_system.balancing.pool import DRAINING  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]


async def start_remote() -> tuple[web.AppRunner, int]:
    """An outside backend, later stopped so the dashboard shows a down card."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def tasks(request: web.Request) -> web.Response:
        return web.json_response({"tasks": [], "total": 0, "limit": 100, "offset": 0})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/tasks", tasks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the chosen free port


async def traffic(url: str, seconds: float, stop_remote) -> None:  # noqa: ANN001 - an async callable
    rng = random.Random(4)
    async with aiohttp.ClientSession() as http:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while (elapsed := loop.time() - started) < seconds:
            if stop_remote is not None and elapsed > seconds * 0.6:
                await stop_remote()
                stop_remote = None
            rate = 12 + 8 * math.sin(elapsed / 9)  # requests per second, a gentle wave
            roll = rng.random()
            if roll < 0.06:
                method, path, body = "GET", f"/tasks/{rng.randint(1000, 9999)}", None
            elif roll < 0.08:
                method, path, body = "POST", "/tasks", b"{}"
            elif roll < 0.09:
                method, path, body = "GET", "/debug/crash", None
            elif roll < 0.095:
                method, path, body = "DELETE", "/status", None
            elif roll < 0.25:
                method, path, body = "POST", "/tasks", b'{"title": "write the docs"}'
            else:
                method, path, body = "GET", "/tasks?limit=5", None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            async with http.request(method, url + path, data=body, headers=headers) as response:
                await response.read()
            await asyncio.sleep(1 / rate)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--width", type=int, default=1280, help="the window's width in CSS pixels (360 for a phone)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")))
    args = parser.parse_args()
    remote, remote_port = await start_remote()
    with tempfile.TemporaryDirectory() as folder:
        config = parse_config(
            {
                "balancer": {"port": 0},
                "health": {"interval": 0.5, "rise": 2, "fall": 2},
                "log": {"file": "balancer.log"},
                "backends": [
                    {"name": "backend-1", "port": 0},
                    {"name": "backend-2", "port": 0},
                    {"name": "backend-3", "port": 0},
                    {"name": "remote-1", "url": f"http://127.0.0.1:{remote_port}"},
                ],
            },
            base_dir=Path(folder),
        )
        async with System(config) as system:
            await traffic(system.balancer_url, args.seconds, remote.cleanup)
            assert system.pool is not None
            backend_3 = system.pool.get("backend-3")
            assert backend_3 is not None
            system.membership.set_admin_state(backend_3, DRAINING)  # as `POST /admin/backends/backend-3/drain`
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = await browser.new_page(viewport={"width": args.width, "height": 1020})
                await page.goto(system.balancer_url + "/")
                await page.wait_for_selector('body[data-feed="live"]')
                await page.wait_for_timeout(1500)  # one more update, so the ages are fresh
                await page.screenshot(path=args.out, full_page=True)
                await browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
