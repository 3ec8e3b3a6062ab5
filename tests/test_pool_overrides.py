"""A pool's own check settings (`[pools.NAME.health]`), slow start, sticky cookie and backups
over real sockets: each acts within its pool, and a pool without its own key takes the global one."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clock import FakeClock
from support.config_files import FAST_HEALTH
from support.through import backend_statuses, served
from support.waiting import wait_for

from lb_system import System
from lb_system.balancing.pool import Backend
from lb_system.balancing.pools import Pools
from lb_system.cli.main import main

API = {"path_prefix": "/api", "pool": "api"}


def registry(system: System) -> Pools:
    assert system.pool is not None
    return system.pool


def member(system: System, name: str) -> Backend:
    backend = registry(system).get(name)
    assert backend is not None
    return backend


def entries(*backends: tuple[Any, str], **extra: dict[str, Any]) -> list[dict[str, Any]]:
    """[[backends]] for (server, pool) pairs; `extra` adds keys to a backend's entry by name."""
    return [{"name": s.name, "url": s.url, "pool": pool, **extra.get(s.name, {})} for s, pool in backends]


async def test_a_pool_checks_with_its_own_expectations_and_the_others_with_the_global_ones(
    fake_backends, make_config, start_system, http
) -> None:
    api_1, api_2, web_1 = await fake_backends("api-1", "api-2", "web-1")
    config = make_config(
        backends=entries((api_1, "api"), (api_2, "api"), (web_1, "default")),
        routes=[API],
        health={**FAST_HEALTH, "expect_status": "200"},
        pools={"api": {"health": {"expect_body": '"server": "api-1"'}}},
    )
    system = await start_system(config)
    shown = await backend_statuses(http, system.balancer_url)
    assert shown["api-2"]["last_error"] == 'expected body containing \'"server": "api-1"\', got 200 without it'
    assert shown["api-1"]["healthy"] and shown["web-1"]["healthy"]  # web-1's pool expects no body
    assert set(await served(http, system.balancer_url, 4, path="/api/x")) == {"api-1"}
    # The pool keeps the global check keys it does not set itself.
    assert registry(system)["api"].health.expect_status == "200"


async def test_a_pool_slow_starts_by_its_own_slow_start(fake_backends, make_config, start_system, http) -> None:
    clock = FakeClock()
    api_1, api_2, web_1, web_2 = await fake_backends("api-1", "api-2", "web-1", "web-2", misbehaves=False)
    config = make_config(
        backends=entries((api_1, "api"), (api_2, "api"), (web_1, "default"), (web_2, "default")),
        routes=[API],
        health=FAST_HEALTH,
        pools={"api": {"slow_start": 100}},
    )
    system = await start_system(config, clock=clock)
    for server in (api_2, web_2):
        await server.stop()
    await wait_for(lambda: not member(system, "api-2").healthy and not member(system, "web-2").healthy)
    for server in (api_2, web_2):
        await server.start()
    await wait_for(lambda: member(system, "api-2").serving and member(system, "web-2").serving)
    shown = await backend_statuses(http, system.balancer_url)
    assert (shown["api-2"]["effective_weight"], shown["web-2"]["effective_weight"]) == (0.1, 1)
    assert (await served(http, system.balancer_url, 110, path="/api/x"))["api-2"] == 10
    assert (await served(http, system.balancer_url, 10, path="/page"))["web-2"] == 5


async def test_a_pool_sets_its_own_sticky_cookie_and_another_the_global_one(
    fake_backends, make_config, start_system, http
) -> None:
    api_1, web_1 = await fake_backends("api-1", "web-1", misbehaves=False)
    config = make_config(
        backends=entries((api_1, "api"), (web_1, "default")),
        routes=[API],
        health=FAST_HEALTH,
        balancer={"sticky_cookie": "site"},
        pools={"api": {"sticky_cookie": "api_pin"}},
    )
    system = await start_system(config)
    async with http.get(system.balancer_url + "/api/x") as response:
        assert response.headers["Set-Cookie"].startswith("api_pin=")
    async with http.get(system.balancer_url + "/page") as response:
        assert response.headers["Set-Cookie"].startswith("site=")


async def test_a_backup_stands_in_for_its_own_pool_only(fake_backends, make_config, start_system, http) -> None:
    api_1, spare, web_1 = await fake_backends("api-1", "spare", "web-1", misbehaves=False)
    config = make_config(
        backends=entries((api_1, "api"), (spare, "api"), (web_1, "default"), spare={"backup": True}),
        routes=[API],
        health=FAST_HEALTH,
    )
    system = await start_system(config)
    assert set(await served(http, system.balancer_url, 4, path="/api/x")) == {"api-1"}
    await api_1.stop()
    # web-1 serves in the other pool: the api pool's backup takes over all the same.
    await wait_for(lambda: not member(system, "api-1").healthy, message="api-1 down")
    assert set(await served(http, system.balancer_url, 4, path="/api/x")) == {"spare"}
    assert set(await served(http, system.balancer_url, 2, path="/page")) == {"web-1"}


# (where: the pool's own table or its health table, the bad line, the key the error line names)
POOL_BAD = [
    ("pool", 'sticky_cookie = "a;b"', "sticky_cookie"),
    ("pool", "slow_start = -1", "slow_start"),
    ("health", 'expect_status = "2xx"', "expect_status"),
    ("health", 'expect_body = ""', "expect_body"),
    ("health", 'host = "a b"', "host"),
]


def pool_tables(pool: str, where: str, line: str) -> str:
    """[pools.NAME] with sticky_cookie = "pin" (unless `line` sets it), and `line` in it or in its health table."""
    own = [] if line.startswith("sticky_cookie") else ['sticky_cookie = "pin"']
    if where == "pool":
        return f"[pools.{pool}]\n" + "\n".join([*own, line]) + "\n"
    return f"[pools.{pool}]\n" + "\n".join(own) + f"\n[pools.{pool}.health]\n{line}\n"


def error_names(system: System, key: str) -> bool:
    return key in (system.config_error or "")


@pytest.mark.parametrize(("where", "line", "key"), POOL_BAD)
def test_check_refuses_a_bad_pool_value_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, line: str, key: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[backends]]\nname = "a"\nport = 5101\npool = "api"\n' + pool_tables("api", where, line), encoding="utf-8")
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"[pools.api{'.health' if where == 'health' else ''}] {key}" in err, err


async def test_a_bad_pool_value_on_reload_is_refused_and_the_pool_keeps_its_settings(
    config_file, start_system, http: aiohttp.ClientSession
) -> None:
    base = config_file.path.read_text()
    config_file.write_text(base + pool_tables("default", "pool", "slow_start = 1"))
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    for where, line, key in POOL_BAD:
        config_file.write_text(base + pool_tables("default", where, line))
        named = f"[pools.default{'.health' if where == 'health' else ''}] {key}"
        await wait_for(partial(error_names, system, named), message=named)
        async with http.get(system.balancer_url + "/tasks") as response:
            assert response.status == 200 and response.headers["Set-Cookie"].startswith("pin=")
