"""Shared fixtures: real systems on free ports, outside backends a test starts and stops, and
wait-for-condition instead of sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lb_system import Config, System, load_config, parse_config
from lb_system.observability.log import render_message

# Fast health checks (the shortest interval the config allows) so state changes show within a fraction of a second.
FAST_HEALTH = {"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1}


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 5.0, message: str = "condition") -> None:
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


async def refused(url: str) -> bool:
    """True when nothing accepts connections at the URL's host and port."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class FakeClock:
    """A clock whose time only moves when a test sets or advances ``now``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
    """Start Systems (keyword options go to System); every one is stopped at the end of the test."""
    systems: list[System] = []

    async def start(config: Config, **options: Any) -> System:
        system = System(config, logger=logging.getLogger("lb_system"), **options)
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
        app.router.add_route("*", r"/{tail:[\s\S]*}", anything)
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


ServerT = TypeVar("ServerT")


@contextlib.asynccontextmanager
async def started_servers(kind: Callable[[str], ServerT]) -> AsyncIterator[Callable[[str], Awaitable[ServerT]]]:
    """Start test servers of one kind by name; every one is stopped on the way out."""
    started: list[ServerT] = []

    async def start(name: str) -> ServerT:
        server = kind(name)
        await server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


@pytest.fixture
async def outside_backend() -> AsyncIterator[Callable[[str], Awaitable[OutsideBackend]]]:
    async with started_servers(OutsideBackend) as start:
        yield lambda name="outside": start(name)


# --- config files edited while a system runs, and servers that hold requests ----------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(data: dict[str, Any]) -> str:
    """The TOML for a config dict: sections of scalars, and [[backends]]."""
    lines: list[str] = []
    for section, values in data.items():
        if section != "backends":
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for backend in data.get("backends", []):
        lines.append("[[backends]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in backend.items()]
    return "\n".join(lines) + "\n"


class ConfigFile:
    """A config.toml in tmp_path, on free ports, that a test rewrites while the system runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "balancer": {"port": 0},
            "health": dict(FAST_HEALTH),
            "database": {"path": "tasks.db"},
            "log": {"file": "balancer.log"},
            "backends": [{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}],
        }

    def write(self, backends: list[dict[str, Any]] | None = None, **sections: Any) -> None:
        """Merge the given sections (and replace the backends) into the file, then save it."""
        data = _merge(self.data, sections)
        if backends is not None:
            data["backends"] = backends
        self.data = data
        self.write_text(toml_text(data))

    def write_text(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")

    def load(self) -> Config:
        return load_config(self.path)


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFile:
    config = ConfigFile(tmp_path / "config.toml")
    config.write()
    return config


class GatedBackend(OutsideBackend):
    """An outside backend whose `/slow` requests wait until the test opens the gate."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def stop(self) -> None:
        self.gate.set()  # held requests finish instead of holding the server's close
        await super().stop()

    def make_app(self) -> web.Application:
        async def slow(request: web.Request) -> web.Response:
            self.hits += 1
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
            return web.json_response({"server": self.name, "slow": True})

        async def health(request: web.Request) -> web.Response:
            status = 200 if self.healthy else 503
            return web.json_response({"status": "ok" if self.healthy else "sick", "server": self.name}, status=status)

        async def anything(request: web.Request) -> web.Response:
            self.hits += 1
            return web.json_response({"server": self.name, "path": request.path_qs})

        app = web.Application()
        app.router.add_get("/slow", slow)
        app.router.add_get("/health", health)
        app.router.add_route("*", r"/{tail:[\s\S]*}", anything)
        return app


@pytest.fixture
async def gated_backend() -> AsyncIterator[Callable[[str], Awaitable[GatedBackend]]]:
    async with started_servers(GatedBackend) as start:
        yield lambda name="gated": start(name)


class LogRecords(logging.Handler):
    """Records of the lb_system logger at INFO and above, whatever the logging setup."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.INFO) -> list[str]:
        """Each record as its text line after time and level: `<event> key=value ...`."""
        return [render_message(r) for r in self.records if r.levelno >= level]


@pytest.fixture
def lb_log() -> Iterator[LogRecords]:
    logger = logging.getLogger("lb_system")
    handler = LogRecords()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
