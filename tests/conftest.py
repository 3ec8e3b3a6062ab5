"""Shared fixtures: real systems on free ports, outside backends a test starts and stops, and
wait-for-condition instead of sleeps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lb_system import Config, System, parse_config

# Fast health checks so state changes show within a fraction of a second.
FAST_HEALTH = {"interval": 0.05, "timeout": 0.5, "rise": 1, "fall": 1}


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 5.0, message: str = "condition"
) -> None:
    """Poll until `condition` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """A Config on free ports (port 0) with files in tmp_path; keyword sections override."""

    def build(backends: list[dict[str, Any]] | None = None, **sections: Any) -> Config:
        data: dict[str, Any] = {
            "balancer": {"port": 0},
            "health": dict(FAST_HEALTH),
            "database": {"path": "tasks.db"},
            "log": {"file": "balancer.log"},
            "backends": backends
            if backends is not None
            else [{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}],
        }
        return parse_config(_merge(data, sections), base_dir=tmp_path)

    return build


@pytest.fixture
async def start_system() -> AsyncIterator[Callable[[Config], Awaitable[System]]]:
    """Start Systems; every one is stopped at the end of the test."""
    systems: list[System] = []

    async def start(config: Config) -> System:
        system = System(config, logger=logging.getLogger("lb_system"))
        await system.start()
        systems.append(system)
        return system

    yield start
    for system in reversed(systems):
        await system.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session for talking to a running system."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


class OutsideBackend:
    """A small HTTP server outside the system (not hosted by it) that a test can stop and restart
    on the same port, and make sick."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.hits = 0
        self.peers: set[tuple[str, int]] = set()  # client addresses seen: one per connection
        self.server: TestServer | None = None
        self.port: int | None = None

    def make_app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            if not self.healthy:
                return web.json_response({"status": "sick"}, status=503)
            return web.json_response({"status": "ok", "server": self.name})

        async def anything(request: web.Request) -> web.Response:
            self.hits += 1
            if request.transport is not None:
                self.peers.add(request.transport.get_extra_info("peername")[:2])
            body = await request.read()
            if request.path.startswith("/code/"):  # /code/404 answers 404
                return web.json_response({"server": self.name}, status=int(request.path.split("/")[2]))
            return web.json_response(
                {
                    "server": self.name,
                    "method": request.method,
                    "path": request.path_qs,
                    "body_bytes": len(body),
                    "headers": dict(request.headers),
                }
            )

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", anything)
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = TestServer(self.make_app(), host="127.0.0.1", port=self.port or 0)
        await self.server.start_server()
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


@pytest.fixture
async def outside_backend() -> AsyncIterator[Callable[[str], Awaitable[OutsideBackend]]]:
    started: list[OutsideBackend] = []

    async def start(name: str = "outside") -> OutsideBackend:
        backend = OutsideBackend(name)
        await backend.start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()
