"""Hot reload of config.toml: edits applied live over real sockets, state kept, bad edits refused."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time

import aiohttp
import pytest
from support.config_files import FAST_HEALTH
from support.misbehaving import ScriptedServer
from support.waiting import refused, wait_for

from lb_system.balancing.pool import DRAINING
from lb_system.cli.main import install_reload_signal
from lb_system.config import parse_config
from lb_system.operations.reload_plan import RestartRequired, plan_reload

WATCH = 0.05  # seconds between polls of the file in these tests


async def status(http: aiohttp.ClientSession, system) -> dict:
    async with http.get(system.balancer_url + "/status") as response:
        assert response.status == 200
        return await response.json()


def names(data: dict) -> list[str]:
    return [b["name"] for b in data["backends"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the plan: pure policy ----------------------------------------------------------------


def test_plan_lists_backend_and_setting_changes() -> None:
    old = parse_config({"backends": [{"name": "a", "port": 5001}, {"name": "b", "url": "http://h:1"}]})
    new = parse_config(
        {
            "health": {"interval": 0.5},
            "balancer": {"strategy": "least_connections"},
            "backends": [{"name": "a", "port": 5001, "weight": 3}, {"name": "c", "port": 5003}],
        }
    )
    plan = plan_reload(old, new, source="config.toml")
    assert [b.name for b in plan.added] == ["c"]
    assert plan.removed == ("b",)
    assert [(e.name, e.fields, e.moved) for e in plan.edited] == [("a", ["weight"], False)]
    assert plan.settings == (
        "[balancer] strategy: 'round_robin' -> 'least_connections'",
        "[health] interval: 2.0 -> 0.5",
    )
    assert not plan.empty
    assert plan_reload(old, old, source="config.toml").empty


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"balancer": {"port": 9999}}, "[balancer] port"),
        ({"balancer": {"host": "0.0.0.0"}}, "[balancer] host"),
        ({"database": {"path": "other.db"}}, "[database] path"),
    ],
)
def test_plan_refuses_a_change_that_needs_a_restart(edit: dict, key: str) -> None:
    with pytest.raises(RestartRequired) as caught:
        plan_reload(parse_config({}), parse_config(edit), source="config.toml")
    assert str(caught.value).startswith(f"config.toml: {key}: changing it needs a restart")


# --- applied to a running system -----------------------------------------------------------


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_saved_edit_adds_a_hosted_backend_within_two_seconds(config_file, start_system, http) -> None:
    # The production poll interval: this one proves the "noticed within 2 s" promise.
    system = await start_system(config_file.load(), config_path=config_file.path)
    config_file.write(backends=[*config_file.data["backends"], {"name": "backend-3", "port": 0}])
    saved = time.monotonic()
    await wait_for(lambda: system.pool.get("backend-3") is not None, timeout=2.0, message="backend-3 added")
    assert time.monotonic() - saved < 2.0
    await wait_for(lambda: system.pool.get("backend-3").healthy, message="backend-3 up")
    seen = set()
    for _ in range(6):
        async with http.get(system.balancer_url + "/tasks") as response:
            assert response.status == 200
            seen.add(response.headers["X-Backend"])
    assert seen == {"backend-1", "backend-2", "backend-3"}
    async with http.get(system.hosted["backend-3"].url + "/health") as response:
        assert (await response.json())["server"] == "backend-3"


async def test_added_backend_gets_no_traffic_before_its_first_good_check(config_file, start_system, outside_backend) -> None:
    sick = await outside_backend("remote")
    sick.healthy = False
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    config_file.write(backends=[*config_file.data["backends"], {"name": "remote", "url": sick.url}])
    await wait_for(lambda: system.pool.get("remote") is not None and system.pool.get("remote").checked)
    remote = system.pool.get("remote")
    assert not remote.healthy and not remote.eligible
    sick.healthy = True
    await wait_for(lambda: remote.eligible, message="remote joins after a good check")


async def test_removed_backend_finishes_in_flight_requests_and_gets_no_new_ones(
    config_file, start_system, gated_backend, http
) -> None:
    gated = await gated_backend("remote")
    config_file.write(backends=[{"name": "remote", "url": gated.url}, {"name": "backend-1", "port": 0}])
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    remote = system.pool.get("remote")
    slow = asyncio.create_task(http.get(system.balancer_url + "/slow"))
    await wait_for(lambda: gated.active == 1, message="a request in flight on remote")

    config_file.write(backends=[{"name": "backend-1", "port": 0}])
    await wait_for(lambda: system.pool.get("remote") is None, message="remote removed")
    body = await status(http, system)
    assert names(body) == ["backend-1"]
    assert [(b["name"], b["admin_state"], b["drained_at"], b["serving"]) for b in body["retiring"]] == [
        ("remote", DRAINING, None, False)
    ]
    hits = gated.hits
    for _ in range(4):
        async with http.get(system.balancer_url + "/anything") as response:
            assert response.headers["X-Backend"] == "backend-1"
    assert gated.hits == hits

    gated.release.set()
    response = await slow
    assert response.status == 200 and response.headers["X-Backend"] == "remote"
    response.release()
    await wait_for(lambda: remote not in system.pool.retiring, message="remote retired")
    assert remote.drained_at is not None


async def test_removed_hosted_backend_stops_listening(config_file, start_system) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    url = system.hosted["backend-2"].url
    upstream = system.balancer.forwarder.upstream
    await wait_for(lambda: upstream.has_endpoint(url), message="backend-2 checked through the upstream pool")
    config_file.write(backends=[{"name": "backend-1", "port": 0}])
    await wait_for(lambda: "backend-2" not in system.hosted and not system.pool.retiring)
    await wait_for(lambda: refused(url), message="backend-2's port closed")
    await wait_for(lambda: not upstream.has_endpoint(url), message="its upstream connections forgotten")


async def test_a_moved_backends_old_address_is_closed_once_idle(config_file, start_system, http) -> None:
    old, new = await ScriptedServer.start(), await ScriptedServer.start()
    try:
        config_file.write(backends=[{"name": "remote", "url": old.url}])
        system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
        async with http.get(system.balancer_url + "/x") as response:
            assert response.headers["X-Backend"] == "remote"
        upstream = system.balancer.forwarder.upstream
        assert upstream.endpoint(old.url).idle_connections == 1
        config_file.write(backends=[{"name": "remote", "url": new.url}])
        await wait_for(lambda: system.pool.get("remote").url == new.url, message="remote moved")
        await wait_for(lambda: old.open == 0, message="the old address's idle connection closed")
        assert not upstream.has_endpoint(old.url)
    finally:
        await old.close()
        await new.close()


async def test_drain_timeout_bounds_a_removed_backend_with_a_stuck_request(
    config_file, start_system, gated_backend, http, lb_log
) -> None:
    gated = await gated_backend("remote")
    config_file.write(
        balancer={"port": 0, "drain_timeout": 0.2},
        backends=[{"name": "remote", "url": gated.url}, {"name": "backend-1", "port": 0}],
    )
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    slow = asyncio.create_task(http.get(system.balancer_url + "/slow"))
    await wait_for(lambda: gated.active == 1)
    config_file.write(backends=[{"name": "backend-1", "port": 0}])
    await wait_for(lambda: system.pool.get("remote") is None)
    await wait_for(lambda: not system.pool.retiring, message="drain gave up after drain_timeout")
    assert any("backend drain timed out backend=remote" in m for m in lb_log.messages(logging.WARNING))
    gated.release.set()
    (await slow).release()


async def test_kept_backends_keep_health_state_counters_and_history(config_file, start_system, outside_backend, http) -> None:
    sick = await outside_backend("remote")
    sick.healthy = False
    config_file.write(backends=[*config_file.data["backends"], {"name": "remote", "url": sick.url}])
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    for _ in range(4):
        async with http.get(system.balancer_url + "/tasks/999999") as response:
            assert response.status == 404
    before = {b.name: (b, b.requests, b.healthy, len(b.transitions), b.checks_ok) for b in system.pool.backends}
    errors_before = system.tracker.total
    assert errors_before == 4

    config_file.write(
        balancer={"port": 0, "strategy": "least_connections"},
        backends=[*config_file.data["backends"], {"name": "backend-3", "port": 0}],
    )
    await wait_for(lambda: system.pool.get("backend-3") is not None)
    for name, (backend, requests, healthy, transitions, checks_ok) in before.items():
        kept = system.pool.get(name)
        assert kept is backend
        assert kept.requests >= requests and kept.healthy == healthy and len(kept.transitions) >= transitions
        assert kept.checks_ok >= checks_ok
    assert not system.pool.get("remote").healthy  # a down backend stays down across the reload
    assert system.tracker.total == errors_before
    async with http.get(system.balancer_url + "/errors/stats") as response:
        assert (await response.json())["error_types"]["404_NOT_FOUND"] == 4


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[balancer\nport = 0\n", "TOML syntax error"),
        ('[admin]\ntoken_envv = "X"\n', "[admin] token_envv: unknown key"),
        ("[errors]\nrecent = 0\n", "[errors] recent"),
    ],
)
async def test_invalid_edit_changes_nothing_logs_one_error_and_shows_config_error(
    config_file, start_system, http, lb_log, text: str, key: str
) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    running = system.config
    good = config_file.path.read_text()
    config_file.write_text(good + text)
    await wait_for(lambda: system.config_error is not None, message="config_error set")
    body = await status(http, system)
    assert body["config_error"] == system.config_error
    assert str(config_file.path) in body["config_error"] and key in body["config_error"]
    assert system.config is running and names(body) == ["backend-1", "backend-2"]
    errors = lb_log.messages(logging.ERROR)
    assert len(errors) == 1 and key in errors[0] and str(config_file.path) in errors[0]

    config_file.write(backends=[*config_file.data["backends"], {"name": "backend-3", "port": 0}])
    await wait_for(lambda: system.config_error is None, message="a good edit clears config_error")
    body = await status(http, system)
    assert names(body) == ["backend-1", "backend-2", "backend-3"] and body["config_error"] is None
    assert len(lb_log.messages(logging.ERROR)) == 1


@pytest.mark.parametrize(
    ("log", "key"),
    [
        ({"access_file": "balancer.log"}, "[log] access_file"),
        ({"access_max_bytes": -1}, "[log] access_max_bytes"),
        ({"access_backups": 101}, "[log] access_backups"),
    ],
)
async def test_a_bad_access_log_key_is_refused_and_the_old_config_keeps_serving(
    config_file, start_system, http, lb_log, log: dict[str, object], key: str
) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    running = system.config
    config_file.write(log=log)
    await wait_for(lambda: system.config_error is not None, message="config_error set")
    assert key in system.config_error and system.config is running
    body = await status(http, system)
    assert body["config_error"] == system.config_error and names(body) == ["backend-1", "backend-2"]


async def test_edit_needing_a_restart_is_refused_whole(config_file, start_system, http, lb_log) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    config_file.write(
        database={"path": "elsewhere.db"},
        backends=[*config_file.data["backends"], {"name": "backend-3", "port": 0}],
        health={"interval": 0.5},
    )
    await wait_for(lambda: system.config_error is not None)
    assert "[database] path: changing it needs a restart" in system.config_error
    assert "not applied" in system.config_error
    assert system.pool.get("backend-3") is None  # the rest of the edit is not half-applied
    assert system.pool.health.interval == FAST_HEALTH["interval"]
    assert len(lb_log.messages(logging.ERROR)) == 1
    assert "restart" in lb_log.messages(logging.ERROR)[0]


async def test_live_settings_apply_without_a_restart(config_file, start_system, http) -> None:
    logger = logging.getLogger("lb_system")
    level = logger.level
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    try:
        config_file.write(
            balancer={"port": 0, "strategy": "least_connections"},
            health={"interval": 0.15, "rise": 3},
            errors={"recent": 7},
            log={"file": "balancer.log", "level": "DEBUG"},
        )
        await wait_for(lambda: system.pool.health.rise == 3, message="reload applied")
        assert (await status(http, system))["strategy"] == "least_connections"
        assert system.pool.health.interval == 0.15
        assert system.tracker.recent == 7
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(level)


async def test_weight_edit_applies_in_place(config_file, start_system, http) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    backend = system.pool.get("backend-1")
    config_file.write(backends=[{"name": "backend-1", "port": 0, "weight": 3}, {"name": "backend-2", "port": 0}])
    await wait_for(lambda: backend.weight == 3)
    assert system.pool.get("backend-1") is backend and backend.eligible
    served = []
    for _ in range(8):
        async with http.get(system.balancer_url + "/tasks") as response:
            served.append(response.headers["X-Backend"])
    assert served.count("backend-1") == 6


async def test_hosted_port_edit_rebinds_and_keeps_state(config_file, start_system, http) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    backend = system.pool.get("backend-2")
    old_url = backend.url
    for _ in range(2):
        async with http.get(system.balancer_url + "/tasks") as response:
            assert response.status == 200
    requests = backend.requests
    port = free_port()
    config_file.write(backends=[{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": port}])
    await wait_for(lambda: backend.url.endswith(f":{port}"), message="backend-2 moved")
    assert system.pool.get("backend-2") is backend and backend.requests == requests
    await wait_for(lambda: refused(old_url), message="the old port closed")
    await wait_for(lambda: backend.eligible, message="back in rotation after a good check on the new port")
    async with http.get(f"http://127.0.0.1:{port}/health") as response:
        assert (await response.json())["server"] == "backend-2"


async def test_busy_port_refuses_the_whole_edit(config_file, start_system) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_file.write(
            backends=[*config_file.data["backends"], {"name": "backend-3", "port": port}],
            errors={"recent": 9},
        )
        await wait_for(lambda: system.config_error is not None)
    assert f"port {port}" in system.config_error and "backend-3" in system.config_error
    assert system.pool.get("backend-3") is None and system.tracker.recent == 50


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads(config_file, start_system) -> None:
    # A watcher that never polls in time: only the signal can have applied the edit.
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=3600)
    loop = asyncio.get_running_loop()
    installed = install_reload_signal(loop, lambda: system.request_reload("SIGHUP"))
    try:
        config_file.write(errors={"recent": 11})
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: system.tracker.recent == 11, message="SIGHUP reload")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def test_reload_under_load_loses_no_request(config_file, start_system, outside_backend, http) -> None:
    """A steady stream of requests while backends are added and removed by editing the file."""
    remote = await outside_backend("remote")
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    results: list[tuple[float, int, str]] = []  # (start time, status, backend)
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with http.get(system.balancer_url + "/tasks?limit=1") as response:
                    await response.read()
                    results.append((started, response.status, response.headers.get("X-Backend", "-")))
            except aiohttp.ClientError as error:
                results.append((started, 0, repr(error)))
            await asyncio.sleep(0.002)  # bounded: a steady stream, not a flood

    def served_since(moment: float) -> set[str]:
        return {backend for started, status, backend in results if started > moment and status == 200}

    async def edit(backends: list[dict]) -> float:
        config_file.write(backends=backends)
        wanted = [b["name"] for b in backends]
        await wait_for(lambda: [b.name for b in system.pool.backends] == wanted, message=f"pool {wanted}")
        return time.monotonic()

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        b1, b2 = {"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}
        b3, out = {"name": "backend-3", "port": 0}, {"name": "remote", "url": remote.url}
        await wait_for(lambda: len(results) >= 20)

        applied = await edit([b1, b2, b3, out])
        await wait_for(lambda: served_since(applied) >= {"backend-1", "backend-2", "backend-3", "remote"})

        applied = await edit([b2, b3, out])  # backend-1 removed
        await wait_for(lambda: served_since(applied) >= {"backend-2", "backend-3", "remote"})
        after_removal = applied

        applied = await edit([b2, b3])  # the outside one removed
        await wait_for(lambda: len([r for r in results if r[0] > applied]) >= 40)
        after_remote_removal = applied

        readded = time.monotonic()  # before the save: nothing started earlier can see the new backend-1
        applied = await edit([b1, b3])  # backend-1 back (a new server on a new port), backend-2 removed
        await wait_for(lambda: served_since(applied) >= {"backend-1", "backend-3"})
        await wait_for(lambda: len([r for r in results if r[0] > applied]) >= 40)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    failed = [r for r in results if r[1] != 200]
    assert failed == [] and len(results) > 200
    # No request that started after a removal was applied went to the removed backend.
    assert "backend-1" not in {b for s, _, b in results if after_removal < s < readded}
    assert "remote" not in {b for s, _, b in results if s > after_remote_removal}
    assert "backend-2" not in {b for s, _, b in results if s > applied}
    await wait_for(lambda: not system.pool.retiring, message="every removed backend retired")
    assert sorted(system.hosted) == ["backend-1", "backend-3"]


@pytest.mark.skipif(sys.platform == "win32", reason="uses SO_REUSEADDR semantics of POSIX")
async def test_removed_and_readded_backend_on_a_fixed_port(config_file, start_system, http) -> None:
    port = free_port()
    config_file.write(backends=[{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": port}])
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    config_file.write(backends=[{"name": "backend-1", "port": 0}])
    await wait_for(lambda: "backend-2" not in system.hosted and not system.pool.retiring)
    config_file.write(backends=[{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": port}])
    await wait_for(lambda: system.pool.get("backend-2") is not None and system.pool.get("backend-2").eligible)
    assert system.config_error is None


async def test_hosted_backend_edited_into_an_outside_one_keeps_its_name_and_counters(
    config_file, start_system, outside_backend, http
) -> None:
    remote = await outside_backend("elsewhere")
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    backend = system.pool.get("backend-2")
    old_url = backend.url
    async with http.get(system.balancer_url + "/tasks"), http.get(system.balancer_url + "/tasks"):
        pass
    requests = backend.requests
    config_file.write(backends=[{"name": "backend-1", "port": 0}, {"name": "backend-2", "url": remote.url}])
    await wait_for(lambda: backend.url == remote.url and backend.eligible, message="backend-2 now outside")
    assert system.pool.get("backend-2") is backend and not backend.hosted and backend.requests == requests
    assert "backend-2" not in system.hosted
    await wait_for(lambda: refused(old_url), message="the hosted server closed")
    hits = remote.hits
    for _ in range(4):
        async with http.get(system.balancer_url + "/tasks") as response:
            assert response.status == 200
    assert remote.hits == hits + 2


async def test_watcher_reports_each_settled_edit_once(tmp_path) -> None:
    from lb_system.operations.config_watch import ConfigWatcher

    path = tmp_path / "config.toml"
    path.write_text("a = 1\n")
    seen: list[str] = []

    async def on_change() -> None:
        seen.append(path.read_text())

    watcher = ConfigWatcher(path, on_change, interval=0.01)
    watcher.start()
    try:
        path.write_text("a = 2\n")
        await wait_for(lambda: seen == ["a = 2\n"])
        path.write_text("a = 3\n")
        await wait_for(lambda: seen == ["a = 2\n", "a = 3\n"])
    finally:
        await watcher.stop()


async def test_readding_a_backend_whose_port_is_still_draining_applies_once_it_drained(config_file, start_system) -> None:
    port = free_port()
    config_file.write(backends=[{"name": "backend-2", "port": port}])
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    backend = system.pool.get("backend-2")
    # An upload that the client has not finished sending: in flight through the balancer on backend-2.
    host, balancer_port = system.balancer_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(balancer_port))
    writer.write(
        b"POST /tasks HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"7\r\n" + b'{"title' + b"\r\n"
    )
    await writer.drain()
    await wait_for(lambda: backend.active_requests == 1, message="the upload in flight on backend-2")

    config_file.write(backends=[{"name": "backend-1", "port": 0}])
    await wait_for(lambda: backend in system.pool.retiring)
    config_file.write(backends=[{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": port}])
    await wait_for(lambda: system.config_error is not None)
    assert "held by backend-2, removed and still draining" in system.config_error

    rest = b'": "drained"}'
    writer.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 201")
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: system.pool.get("backend-2") is not None, message="the edit applied after the drain")
    await wait_for(lambda: system.pool.get("backend-2").eligible)
    assert system.config_error is None and system.pool.get("backend-2") is not backend


async def test_a_shorter_health_interval_applies_without_waiting_out_the_old_one(config_file, start_system) -> None:
    config_file.write(health={"interval": 60.0})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=WATCH)
    backend = system.pool.get("backend-1")
    checks = backend.checks_ok
    config_file.write(health={"interval": 0.1})
    await wait_for(lambda: backend.checks_ok >= checks + 3, timeout=5, message="checks at the new interval")
