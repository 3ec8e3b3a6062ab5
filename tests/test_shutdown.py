"""Graceful shutdown: no new connections on any port, in-flight requests finish, exit 0."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from support.config_files import FAST_HEALTH, toml_text
from support.waiting import refused, wait_for

from lb_system import System

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no SIGTERM to deliver to a child gracefully")
async def test_sigterm_lets_in_flight_requests_finish_while_new_connections_are_refused(
    tmp_path: Path, gated_backend, http: aiohttp.ClientSession
) -> None:
    gated = await gated_backend("slow")
    config = tmp_path / "config.toml"
    config.write_text(
        toml_text(
            {
                "balancer": {"port": 0, "shutdown_grace": 10.0},
                "health": FAST_HEALTH,
                "database": {"path": "tasks.db"},
                "log": {"file": "balancer.log"},
                "backends": [{"name": "slow", "url": gated.url}, {"name": "backend-1", "port": 0}],
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), "--config", str(config),
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    started = asyncio.Event()

    async def read_stderr() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            lines.append(raw.decode(errors="replace"))
            if lines[-1].startswith("lb_system: balancer on"):
                started.set()

    reader = asyncio.create_task(read_stderr())
    try:
        await asyncio.wait_for(started.wait(), 20)
        banner = next(line for line in lines if line.startswith("lb_system: balancer on"))
        balancer_found = re.search(r"balancer on (http://[^;,\s]+)", banner)
        backend_found = re.search(r"backend-1 on (http://[^;,\s]+)", banner)
        assert balancer_found is not None and backend_found is not None, banner
        balancer, backend = balancer_found.group(1), backend_found.group(1)

        # Round robin over the two: three of the six wait at the gated backend, three get a quick 404.
        slow = [asyncio.create_task(http.get(balancer + "/slow")) for _ in range(6)]
        await wait_for(lambda: gated.active == 3, timeout=10, message="three requests in flight")

        process.send_signal(signal.SIGTERM)
        await wait_for(lambda: refused(balancer), timeout=10, message="the balancer port refusing")
        await wait_for(lambda: refused(backend), timeout=10, message="the backend port refusing")
        assert process.returncode is None and gated.active == 3  # still finishing them

        gated.release.set()
        statuses = []
        for task in slow:
            response = await task
            statuses.append((response.status, response.headers.get("X-Backend")))
            response.release()
        assert sorted(statuses) == [(200, "slow")] * 3 + [(404, "backend-1")] * 3
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reader
    output = "".join(lines)
    assert "stopping" in output and "Traceback" not in output


async def test_requests_outliving_shutdown_grace_are_cut_and_stop_returns(make_config, gated_backend, http) -> None:
    gated = await gated_backend("slow")
    config = make_config(balancer={"port": 0, "shutdown_grace": 0.3}, backends=[{"name": "slow", "url": gated.url}])
    system = System(config, logger=logging.getLogger("lb_system"))
    await system.start()
    slow = asyncio.create_task(http.get(system.balancer_url + "/slow"))
    await wait_for(lambda: gated.active == 1)
    began = time.monotonic()
    await system.stop()
    assert time.monotonic() - began < 2.0
    with pytest.raises(aiohttp.ClientError):
        await slow
    assert await refused(system.balancer_url)
