"""GET /status per-backend detail over real sockets: checks, last check, downtime, latency,
last-minute error rate, and the last transitions with their reasons."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from support.waiting import wait_for

from lb_system.operations.system import System

FOUNDATION_FIELDS = {
    "name", "url", "hosted", "healthy", "last_check", "last_check_ms",
    "consecutive_failures", "last_error", "requests", "active_requests",
}  # fmt: skip
DETAIL_FIELDS = {
    "state_since", "checks_ok", "checks_failed", "last_check_status",
    "downtime_s", "latency_ms", "error_rate", "server_error_rate", "transitions", "serving",
}  # fmt: skip


async def backends(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with http.get(url + "/status") as response:
        assert response.status == 200
        return {b["name"]: b for b in (await response.json())["backends"]}


async def test_status_has_every_foundation_and_detail_field(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    for backend in (await backends(http, system.balancer_url)).values():
        assert FOUNDATION_FIELDS | DETAIL_FIELDS <= set(backend)
        assert backend["latency_ms"] == {"p50": None, "p95": None, "p99": None}
        assert backend["error_rate"] == 0.0 and backend["server_error_rate"] == 0.0
        assert backend["serving"] is True
        assert backend["downtime_s"] == 0
        assert backend["last_check_status"] == "200"
        assert backend["checks_ok"] >= 1 and backend["checks_failed"] == 0
        assert datetime.fromisoformat(backend["state_since"].replace("Z", "+00:00"))
        assert backend["transitions"][0]["to"] == "up"
        assert backend["transitions"][0]["reason"] == "health check passed"


async def status_loop(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/status") as response:
        loop: str = (await response.json())["loop"]
        return loop


async def test_status_names_the_loop_that_runs(make_config, start_system, http) -> None:
    # asyncio's, unless the tests run with --event-loop uvloop
    system = await start_system(make_config())
    assert await status_loop(http, system.balancer_url) == type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed (Windows)")
def test_status_says_uvloop_runs_under_uvloop(make_config) -> None:
    import uvloop

    async def served_status() -> str:
        async with System(make_config(), logger=logging.getLogger("lb_system")) as system:
            async with aiohttp.ClientSession() as http:
                return await status_loop(http, system.balancer_url)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(served_status()) == "uvloop"


async def test_latency_and_error_rate_follow_the_proxied_requests(make_config, start_system, http) -> None:
    system = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}]))
    for path in ("/tasks", "/tasks", "/tasks", "/tasks/987654"):
        async with http.get(system.balancer_url + path) as response:
            await response.read()
    backend = (await backends(http, system.balancer_url))["backend-1"]
    assert backend["requests"] == 4
    assert backend["error_rate"] == 0.25
    assert backend["server_error_rate"] == 0.0  # a client's 404 is not the backend's fault
    latency = backend["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < 5000


async def test_a_stopped_backend_shows_its_failures_downtime_and_transitions(
    make_config, start_system, outside_backend, http
) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}, {"name": "outside", "url": outside.url}]))
    url = system.balancer_url
    first = (await backends(http, url))["outside"]

    await outside.stop()
    await wait_for(lambda: not system.pool.get("outside").healthy, message="outside to go down")
    down = (await backends(http, url))["outside"]
    assert down["healthy"] is False
    assert down["last_check_status"] == "connection refused"
    assert down["checks_failed"] >= 1
    assert down["state_since"] > first["state_since"]
    assert down["transitions"][0]["to"] == "down"
    assert down["transitions"][0]["reason"] == "health check failed: connection refused"

    async def downtime() -> float:
        return (await backends(http, url))["outside"]["downtime_s"]

    await wait_for(lambda: _grew(downtime, 0.05), message="downtime to grow while down")

    await outside.start()
    await wait_for(lambda: system.pool.get("outside").healthy, message="outside to come back")
    back = (await backends(http, url))["outside"]
    assert back["last_check_status"] == "200"
    assert [t["to"] for t in back["transitions"][:3]] == ["up", "down", "up"]
    assert back["downtime_s"] > 0
    # Up again: the total stops growing.
    assert (await backends(http, url))["outside"]["downtime_s"] == back["downtime_s"]


async def _grew(read, at_least: float) -> bool:  # noqa: ANN001 - an async reader of a number
    return await read() >= at_least


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_transitions_keep_only_the_last_ten(make_config, start_system, outside_backend, http) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "outside", "url": outside.url}]))
    backend = system.pool.get("outside")
    for _ in range(6):  # 12 transitions after the first
        await outside.stop()
        await wait_for(lambda: not backend.healthy, message="down")
        await outside.start()
        await wait_for(lambda: backend.healthy, message="up")
    shown = (await backends(http, system.balancer_url))["outside"]["transitions"]
    assert len(shown) == 10
    assert shown[0]["to"] == "up" and shown[1]["to"] == "down"  # newest first
    assert all(t["reason"] for t in shown)
