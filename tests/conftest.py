"""Shared fixtures: real systems on free ports, outside backends a test starts and stops, config
files, a fake clock and the log records. The helpers themselves are in tests/support/."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.backends import FakeBackend, started_backends
from support.clock import FakeClock
from support.config_files import BASE_CONFIG, ConfigFile, merge
from support.logs import LogRecords, LogSetup
from support.postgres import TemporaryPostgres, reset_task_tables, unavailable_reason

from lb_system import Config, SqliteTaskStore, System, TaskStore, parse_config


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TemporaryPostgres]:
    """One real PostgreSQL for the whole session (started on first use); skips where there is none."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with TemporaryPostgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], TaskStore]]:
    """New (unopened) task stores on one database, SQLite or PostgreSQL: the task API suite runs on both."""
    if request.param == "sqlite":
        yield lambda: SqliteTaskStore(tmp_path / "tasks.db")
        return
    from lb_system.tasks.postgres_store import PostgresTaskStore

    server: TemporaryPostgres = request.getfixturevalue("postgres_server")
    reset_task_tables(server)
    yield lambda: PostgresTaskStore(server.url(), pool_min=1, pool_max=4)
    reset_task_tables(server)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """A Config on free ports (port 0) with files in tmp_path; keyword sections override."""

    def build(backends: list[dict[str, Any]] | None = None, **sections: Any) -> Config:
        data = merge(BASE_CONFIG, sections)
        if backends is not None:
            data["backends"] = backends
        return parse_config(data, base_dir=tmp_path)

    return build


@pytest.fixture
async def start_system() -> AsyncIterator[Callable[..., Awaitable[System]]]:
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


@pytest.fixture
async def outside_backend() -> AsyncIterator[Callable[..., Awaitable[FakeBackend]]]:
    """Start outside backends by name (default "outside"; keyword options go to FakeBackend);
    all stopped at the end of the test."""
    async with started_backends() as start:

        def start_one(name: str = "outside", **options: bool) -> Awaitable[FakeBackend]:
            return start(name, **options)

        yield start_one


@pytest.fixture
async def fake_backends() -> AsyncIterator[Callable[..., Awaitable[list[FakeBackend]]]]:
    """Start outside backends by names (keyword options go to each FakeBackend); all stopped at the end."""
    async with started_backends() as start:

        async def start_all(*names: str, **options: bool) -> list[FakeBackend]:
            return [await start(name, **options) for name in names]

        yield start_all


@pytest.fixture
def gated_backend(outside_backend: Callable[..., Awaitable[FakeBackend]]) -> Callable[..., Awaitable[FakeBackend]]:
    """An outside backend (default name "gated") whose `/slow` requests wait for `release`."""

    def start_one(name: str = "gated") -> Awaitable[FakeBackend]:
        return outside_backend(name)

    return start_one


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFile:
    config = ConfigFile(tmp_path / "config.toml")
    config.write()
    return config


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


@pytest.fixture
def log_to() -> Iterator[LogSetup]:
    """The lb_system logger set up as `python run.py` does, restored at the end of the test."""
    logger = logging.getLogger("lb_system")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    setup = LogSetup()
    yield setup
    setup.flush()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handlers, level, propagate = saved
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="run the tests on this event loop (uvloop: the one `python run.py` uses where it exists)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--event-loop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise pytest.UsageError("--event-loop uvloop: uvloop is not installed (it is not on Windows)") from None
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """A database left open (say, by a test that timed out half-way) would hang the interpreter's
    exit: aiosqlite's worker thread is not a daemon. Name it and fail the run instead of hanging CI."""
    leaked = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in leaked:
        thread.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        sys.stderr.write(f"\nthreads left running after the tests, keeping the process alive: {[t.name for t in leaked]}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(_exit_status[-1] if _exit_status and _exit_status[-1] else 1)
