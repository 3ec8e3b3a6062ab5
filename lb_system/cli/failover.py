"""`python run.py demo --failover`: a failover rehearsal in one terminal.

Keeps a steady stream of requests through the balancer, stops a hosted backend through the
admin API, shows /status as it turns down and how many client requests failed (0), then starts
it again and shows it back up. It replaces closing a server window by hand.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from lb_system.cli.client_errors import describe_failure
from lb_system.cli.demo import Unreachable

TRAFFIC_PATH = "/tasks?limit=1"
POLL_SECONDS = 0.1


@dataclass
class Traffic:
    """What the steady clients saw."""

    total: int = 0
    failed: int = 0
    by_backend: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, backend: str | None, failure: str | None) -> None:
        self.total += 1
        if failure is None:
            self.by_backend[backend or "?"] += 1
        else:
            self.failed += 1
            self.failures[failure] += 1
        self.progress.set()

    async def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition()` holds, re-checked after each answered request."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self.progress.clear()
                    await self.progress.wait()
        except TimeoutError:
            return False
        return True


async def _client(session: aiohttp.ClientSession, url: str, traffic: Traffic, stop: asyncio.Event, pause: float) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + TRAFFIC_PATH) as response:
                await response.read()
                failure = None if response.status == 200 else f"status {response.status}"
                traffic.record(response.headers.get("X-Backend"), failure)
        except (TimeoutError, aiohttp.ClientError) as error:
            traffic.record(None, describe_failure(error))
        await asyncio.sleep(pause)  # pacing: a steady stream, not a load test


async def _get_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    try:
        async with session.get(url + "/status") as response:
            status: dict[str, Any] = await response.json()
            return status
    except (TimeoutError, aiohttp.ClientConnectionError) as error:
        raise Unreachable(f"nothing answers at {url} ({describe_failure(error)}); is `python run.py` running?") from None


def _status_line(status: dict[str, Any]) -> str:
    parts = []
    for b in status["backends"]:
        health = "up" if b["healthy"] else f"DOWN ({b.get('last_error') or 'recovering'})"
        extra = "" if b.get("listening") is not False else ", not listening"
        parts.append(f"{b['name']}: {health}, {b['admin_state']}{extra}")
    return f"[STATUS] healthy {status['healthy']}/{status['total']} | " + " | ".join(parts)


async def _watch(session: aiohttp.ClientSession, url: str, name: str, *, healthy: bool, timeout: float, out: TextIO) -> bool:
    """Print /status each time it changes until `name` is (un)healthy; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    shown = None
    while True:
        status = await _get_status(session, url)
        line = _status_line(status)
        if line != shown:
            print(line, file=out)
            shown = line
        backend = next((b for b in status["backends"] if b["name"] == name), None)
        if backend is not None and backend["healthy"] == healthy:
            return True
        if loop.time() >= deadline:
            print(f"[FAILOVER] {name} did not turn {'up' if healthy else 'down'} within {timeout:.0f}s", file=out)
            return False
        await asyncio.sleep(POLL_SECONDS)


async def _admin(session: aiohttp.ClientSession, url: str, token: str, path: str, out: TextIO) -> bool:
    async with session.post(url + path, headers={"Authorization": f"Bearer {token}"}) as response:
        body = await response.text()
        print(f"  POST {path} -> {response.status}", file=out)
        if response.status != 200:
            try:
                body = json.loads(body).get("detail", body)
            except (ValueError, AttributeError):
                pass
            print(f"  {body}", file=out)
            return False
    return True


async def run_failover(
    url: str,
    token: str,
    *,
    backend: str = "backend-2",
    out: TextIO = sys.stdout,
    timeout: float = 30.0,
    clients: int = 2,
    pause: float = 0.02,
) -> int:
    """0 when the backend went down and came back with no failed client request, 1 otherwise."""
    url = url.rstrip("/")
    traffic = Traffic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        status = await _get_status(session, url)
        if backend not in [b["name"] for b in status["backends"]]:
            print(f"error: no backend named {backend!r} at {url}", file=out)
            return 1
        print(f"[FAILOVER] Steady traffic through {url} (GET {TRAFFIC_PATH}, {clients} clients)...", file=out)
        print(_status_line(status), file=out)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_client(session, url, traffic, stop, pause)) for _ in range(clients)]
        went_down = came_back = False
        try:
            await traffic.wait(lambda: traffic.total >= 20, timeout)
            print(f"\n[FAILOVER] Stopping {backend} through the admin API...", file=out)
            if not await _admin(session, url, token, f"/admin/backends/{backend}/stop", out):
                return 1
            went_down = await _watch(session, url, backend, healthy=False, timeout=timeout, out=out)
            seen = traffic.total
            await traffic.wait(lambda: traffic.total >= seen + 20, timeout)
            print(
                f"[FAILOVER] {backend} is down; failed client requests: {traffic.failed} of {traffic.total}",
                file=out,
            )
            print(f"\n[FAILOVER] Starting {backend} again...", file=out)
            if not await _admin(session, url, token, f"/admin/backends/{backend}/start", out):
                return 1
            came_back = await _watch(session, url, backend, healthy=True, timeout=timeout, out=out)
            served = traffic.by_backend[backend]
            came_back = came_back and await traffic.wait(lambda: traffic.by_backend[backend] > served, timeout)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    served_by = ", ".join(f"{name} {count}" for name, count in sorted(traffic.by_backend.items()))
    print(f"\n[RESULT] {traffic.total} requests, {traffic.failed} failed; served by {served_by}", file=out)
    if traffic.failures:
        print(f"[RESULT] failures: {dict(traffic.failures)}", file=out)
    return 0 if went_down and came_back and traffic.failed == 0 else 1
