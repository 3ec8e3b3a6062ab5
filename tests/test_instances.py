"""Several balancer instances on one port ([balancer] reuse_port): they share the port, each names
itself in /status and /errors/stats, and their /metrics differ in no label."""

from __future__ import annotations

import os
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb_system import ConfigError, parse_config
from lb_system.config import check_processes, reuse_port_available
from lb_system.operations.serving import StartupError
from lb_system.operations.system import System

needs_reuse_port = pytest.mark.skipif(not reuse_port_available(), reason="no SO_REUSEPORT on this platform")


async def get_json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as response:
        assert response.status == 200
        body: dict = await response.json()
        return body


@needs_reuse_port
async def test_two_instances_with_reuse_port_listen_on_one_port(make_config, start_system, http) -> None:
    first = await start_system(make_config(balancer={"port": 0, "reuse_port": True}))
    port = int(first.balancer_url.rsplit(":", 1)[1])
    second = await start_system(make_config(balancer={"port": port, "reuse_port": True}, database={"path": "second.db"}))
    assert second.balancer_url == first.balancer_url
    assert (await get_json(http, second.balancer_url + "/health"))["status"] == "ok"


@needs_reuse_port
async def test_each_instance_answers_alone_on_its_instance_port(make_config, start_system, http) -> None:
    shared = {"port": 0, "reuse_port": True, "instance_port": 0}
    first = await start_system(make_config(balancer=shared))
    port = int(first.balancer_url.rsplit(":", 1)[1])
    second = await start_system(make_config(balancer=shared | {"port": port}, database={"path": "second.db"}))
    assert first.instance_url and second.instance_url and first.instance_url != second.instance_url
    async with http.get(second.instance_url + "/tasks/999999") as response:
        assert response.status == 404
    assert (await get_json(http, first.instance_url + "/errors/stats"))["total_errors"] == 0
    assert (await get_json(http, second.instance_url + "/errors/stats"))["total_errors"] == 1


@pytest.mark.parametrize(
    ("balancer", "backends", "expected"),
    [
        ({"port": 8080, "instance_port": 8080}, [], r"\[balancer\] instance_port: must differ from \[balancer\] port"),
        (
            {"port": 8080, "instance_port": 9101},
            [{"name": "b1", "port": 9101}],
            r"\[\[backends\]\] #1 \(b1\) port: port 9101 is already used by \[balancer\] instance_port",
        ),
    ],
)
def test_the_instance_port_is_a_port_of_its_own(balancer: dict, backends: list, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^lb.toml: " + expected):
        parse_config({"balancer": balancer, "backends": backends}, source="lb.toml")


async def test_without_reuse_port_a_second_instance_finds_the_port_in_use(make_config, start_system) -> None:
    first = await start_system(make_config())
    port = int(first.balancer_url.rsplit(":", 1)[1])
    with pytest.raises(StartupError, match=f"port {port} .* already in use"):
        await start_system(make_config(balancer={"port": port}, database={"path": "second.db"}))


async def test_status_and_error_stats_name_the_instance(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    expected = {"host": socket.gethostname(), "pid": os.getpid()}
    assert (await get_json(http, system.balancer_url + "/status"))["instance"] == expected
    assert (await get_json(http, system.balancer_url + "/errors/stats"))["instance"] == expected


def test_reuse_port_is_a_config_error_where_the_platform_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)  # as on Windows
    with pytest.raises(ConfigError, match=r"^lb.toml: \[balancer\] reuse_port: SO_REUSEPORT is not available"):
        parse_config({"balancer": {"reuse_port": True}}, source="lb.toml")
    assert parse_config({"balancer": {"reuse_port": False}}).balancer.reuse_port is False


def test_processes_are_refused_where_the_platform_lacks_reuse_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)  # as on Windows, where POSIX signals are missing too
    with pytest.raises(ConfigError, match=r"^--processes is not available on this platform"):
        check_processes(parse_config({}), 1)


@pytest.mark.parametrize("name", ["balancer-{PID}.log", "balancer-{host}.log", "balancer-{pid.log"])
def test_a_log_file_may_hold_no_placeholder_but_pid(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^lb.toml: \[log\] file: the only placeholder .* \{pid\}"):
        parse_config({"log": {"file": name}}, source="lb.toml")


def series(exposition: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Each sample's name and labels, without its value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


async def test_identical_instances_export_the_same_series(make_config, start_system, http) -> None:
    # Prometheus's own `instance` label tells them apart; a pid or host label would split every series.
    systems: list[System] = [await start_system(make_config(database={"path": f"tasks-{index}.db"})) for index in range(2)]
    expositions = []
    for system in systems:
        async with http.get(system.balancer_url + "/metrics") as response:
            expositions.append(await response.text())
    first, second = (series(text) for text in expositions)
    assert first == second
    labels = {name for _, pairs in first for name, _ in pairs}
    assert not labels & {"instance", "pid", "host", "hostname", "job"}
