"""Bad values of the check, backup, slow-start and sticky-cookie keys: `check` exits 2 with one
line naming the key, and a hot reload refuses them while the old config keeps serving."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.config_files import BASE_CONFIG, merge, toml_text
from support.waiting import wait_for

from lb_system import System
from lb_system.cli.main import main

GOOD_BACKENDS = BASE_CONFIG["backends"]

# (sections to merge, backends or None, the key the error line names)
BAD: list[tuple[dict[str, Any], list[dict[str, Any]] | None, str]] = [
    ({"health": {"expect_status": "2xx"}}, None, "[health] expect_status"),
    ({"health": {"expect_status": "200-600"}}, None, "[health] expect_status"),
    ({"health": {"expect_status": "399-200"}}, None, "[health] expect_status"),
    ({"health": {"expect_status": ""}}, None, "[health] expect_status"),
    ({"health": {"expect_status": 200}}, None, "[health] expect_status"),
    ({"health": {"expect_body": ""}}, None, "[health] expect_body"),
    ({"health": {"expect_body": 7}}, None, "[health] expect_body"),
    ({"health": {"host": "two words"}}, None, "[health] host"),
    ({"health": {"host": "example.com:port"}}, None, "[health] host"),
    ({"health": {"path": "/a b"}}, None, "[health] path"),
    ({"health": {"slow_start": -1}}, None, "[health] slow_start"),
    ({"health": {"slow_start": 3601}}, None, "[health] slow_start"),
    ({"health": {"slow_start": "30"}}, None, "[health] slow_start"),
    ({"balancer": {"sticky_cookie": "a;b"}}, None, "[balancer] sticky_cookie"),
    ({"balancer": {"sticky_cookie": ""}}, None, "[balancer] sticky_cookie"),
    ({"balancer": {"sticky_cookie": True}}, None, "[balancer] sticky_cookie"),
    ({}, [{"name": "backend-1", "port": 0, "backup": "yes"}], "[[backends]] #1 (backend-1) backup"),
    ({}, [{"name": "backend-1", "port": 0, "health_path": "health"}], "[[backends]] #1 (backend-1) health_path"),
    ({}, [{"name": "backend-1", "port": 0, "health_path": ""}], "[[backends]] #1 (backend-1) health_path"),
]


def bad_text(sections: dict[str, Any], backends: list[dict[str, Any]] | None) -> str:
    data = merge(BASE_CONFIG, sections)
    if backends is not None:
        data["backends"] = backends
    return toml_text(data)


@pytest.mark.parametrize(("sections", "backends", "key"), BAD)
def test_check_refuses_a_bad_value_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict[str, Any], backends: list | None, key: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(bad_text(sections, backends), encoding="utf-8")
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and str(path) in err, err


def test_check_accepts_good_values_of_every_new_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    sections = {
        "health": {"expect_status": "200,204, 300-399", "expect_body": "ok", "host": "[::1]:8080", "slow_start": 30},
        "balancer": {"sticky_cookie": "lb_backend"},
    }
    backends = [{"name": "backend-1", "port": 0, "health_path": "/ready?full=1"}, {"name": "spare", "port": 0, "backup": True}]
    path.write_text(bad_text(sections, backends), encoding="utf-8")
    assert main(["check", "--config", str(path)]) == 0, capsys.readouterr().err


def refused_for(system: System, key: str) -> bool:
    return key in (system.config_error or "")


async def test_a_reload_with_a_bad_value_is_refused_and_the_old_config_keeps_serving(
    config_file, start_system, http: aiohttp.ClientSession
) -> None:
    config_file.write(balancer={"sticky_cookie": "lb"}, health={"slow_start": 5, "expect_status": "200"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    running = system.config
    for sections, backends, key in BAD:
        config_file.write_text(bad_text(merge(config_file.data, sections), backends))
        await wait_for(partial(refused_for, system, key), message=f"{key} refused")
        assert system.config is running
        async with http.get(system.balancer_url + "/tasks") as response:
            # The old settings serve on: the old cookie name is still set (this client keeps none).
            assert response.status == 200 and response.headers["Set-Cookie"].startswith("lb=")
    assert system.pool is not None and system.pool.health.expect_status == "200"


async def test_sticky_cookie_and_the_check_keys_apply_on_reload(config_file, start_system, http: aiohttp.ClientSession) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    config_file.write(balancer={"sticky_cookie": "pin"}, health={"expect_status": "200-299", "slow_start": 3})
    await wait_for(lambda: system.config.balancer.sticky_cookie == "pin", message="the edit applied")
    assert system.config_error is None and system.pool is not None
    assert (system.pool.health.expect_status, system.pool.health.slow_start) == ("200-299", 3)
    async with http.get(system.balancer_url + "/tasks") as response:
        assert response.status == 200 and response.headers["Set-Cookie"].startswith("pin=")
