"""The whole system over real sockets: balancing, error tracking, health checks and failover."""

from __future__ import annotations

import asyncio
import logging
import re
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from support.config_files import FAST_HEALTH
from support.misbehaving import ScriptedServer, answer, hang_up, on_path
from support.waiting import wait_for

from lb_system.observability.log import fields_of, render_message

PROBLEM = "application/problem+json"


async def json_of(response: aiohttp.ClientResponse) -> dict:
    return await response.json(content_type=None)


async def test_seed_errors_through_the_balancer_are_counted_once_each(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    url = system.balancer_url
    async with http.post(url + "/tasks", data=b"", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await json_of(r))["detail"] == "Empty or malformed JSON body"
    async with http.get(url + "/tasks/999999") as r:
        assert r.status == 404
        assert (await json_of(r))["detail"] == "Task 999999 not found"
    async with http.get(url + "/debug/crash") as r:
        assert r.status == 500
        assert r.content_type == PROBLEM
        assert (await json_of(r))["detail"] == "Internal server error"
    async with http.get(url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["total_errors"] == 3
    assert stats["error_types"] == {"400_BAD_REQUEST": 1, "404_NOT_FOUND": 1, "500_INTERNAL_ERROR": 1}
    assert sum(stats["by_server"].values()) == 3
    assert set(stats["by_server"]) <= {"backend-1", "backend-2"}
    assert [e["status"] for e in stats["recent_errors"]] == [500, 404, 400]
    for record in stats["recent_errors"]:
        assert set(record) >= {"timestamp", "status", "type", "method", "path", "server", "detail", "request_id"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stats["since"])


async def test_fresh_stats_show_the_three_seed_keys_at_zero(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["total_errors"] == 0
    assert stats["error_types"] == {"400_BAD_REQUEST": 0, "404_NOT_FOUND": 0, "500_INTERNAL_ERROR": 0}
    assert stats["recent_errors"] == []


async def test_error_on_a_backend_port_directly_is_recorded_under_its_name(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.hosted["backend-2"].url + "/tasks/77") as r:
        assert r.status == 404
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["by_server"] == {"backend-2": 1}


async def test_balancers_own_errors_are_recorded_under_balancer(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.post(system.balancer_url + "/status") as r:
        assert r.status == 405
        assert r.content_type == PROBLEM
        assert "GET" in r.headers["Allow"]
        assert r.headers["X-Backend"] == "balancer"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["by_server"] == {"balancer": 1}
    assert stats["error_types"]["405_METHOD_NOT_ALLOWED"] == 1


@pytest.mark.parametrize("path", ["/health", "/status", "/metrics", "/", "/errors/stats", "/events"])
async def test_the_balancers_own_answers_name_the_balancer(make_config, start_system, http, path) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + path) as r:
        assert r.status == 200
        assert r.headers["X-Backend"] == "balancer"
        assert r.headers["X-Request-ID"]


async def test_a_forwarded_answer_names_its_backend_and_not_the_balancer(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/tasks") as r:
        assert r.status == 200
        assert r.headers.getall("X-Backend") in (["backend-1"], ["backend-2"])


async def test_round_robin_alternates_and_names_the_backend(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    seen = []
    for _ in range(6):
        async with http.get(system.balancer_url + "/tasks") as r:
            assert r.status == 200
            seen.append(r.headers["X-Backend"])
    assert seen[0::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 3
    assert {seen[0], seen[1]} == {"backend-1", "backend-2"}
    async with http.get(system.balancer_url + "/status") as r:
        status = await r.json()
    assert [b["requests"] for b in status["backends"]] == [3, 3]


async def test_a_task_created_through_one_backend_is_visible_through_the_other(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    one, two = system.hosted["backend-1"].url, system.hosted["backend-2"].url
    async with http.post(one + "/tasks", json={"title": "shared"}) as r:
        task = await r.json()
    async with http.get(f"{two}/tasks/{task['id']}") as r:
        assert r.status == 200
        assert await r.json() == task


async def test_ids_stay_unique_under_concurrent_creation_through_both(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    urls = [system.hosted["backend-1"].url, system.hosted["backend-2"].url, system.balancer_url]

    async def create(i: int) -> int:
        async with http.post(urls[i % 3] + "/tasks", json={"title": f"t{i}"}) as r:
            assert r.status == 201
            return (await r.json())["id"]

    ids = await asyncio.gather(*(create(i) for i in range(60)))
    assert len(set(ids)) == 60


async def test_tasks_survive_a_restart_of_the_whole_system(make_config, start_system, http) -> None:
    config = make_config()
    first = await start_system(config)
    async with http.post(first.balancer_url + "/tasks", json={"title": "durable"}) as r:
        task = await r.json()
    await first.stop()
    second = await start_system(config)
    async with http.get(f"{second.balancer_url}/tasks/{task['id']}") as r:
        assert r.status == 200
        assert (await r.json())["title"] == "durable"


async def test_request_id_is_kept_passed_to_the_backend_returned_and_logged(
    make_config, start_system, outside_backend, http, caplog
) -> None:
    outside = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": outside.url}]))
    with caplog.at_level(logging.INFO, logger="lb_system"):
        async with http.get(system.balancer_url + "/echo", headers={"X-Request-ID": "trace-42"}) as r:
            body = await r.json()
            assert r.headers["X-Request-ID"] == "trace-42"
            assert r.headers["X-Backend"] == "remote-1"
    assert body["headers"]["X-Request-ID"] == "trace-42"
    access = [render_message(r) for r in caplog.records if r.getMessage() == "access"]
    assert any("request_id=trace-42" in line and "status=200" in line and "backend=remote-1" in line for line in access)
    async with http.get(system.balancer_url + "/echo", headers={"X-Request-ID": "bad id!"}) as r:
        assert r.headers["X-Request-ID"] != "bad id!"
        assert (await r.json())["headers"]["X-Request-ID"] == r.headers["X-Request-ID"]


async def test_error_from_an_outside_backend_is_recorded_once_under_its_name(
    make_config, start_system, outside_backend, http
) -> None:
    outside = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": outside.url}]))
    async with http.get(system.balancer_url + "/code/404") as r:
        assert r.status == 404
        assert r.headers["X-Backend"] == "remote-1"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["total_errors"] == 1
    assert stats["by_server"] == {"remote-1": 1}
    assert stats["recent_errors"][0]["path"] == "/code/404"


async def test_health_reports_ok_degraded_unavailable(make_config, start_system, outside_backend, http) -> None:
    one, two = await outside_backend("remote-1"), await outside_backend("remote-2")
    system = await start_system(
        make_config(backends=[{"name": "remote-1", "url": one.url}, {"name": "remote-2", "url": two.url}])
    )

    async def health(expected_status: int = 200) -> dict:
        async with http.get(system.balancer_url + "/health") as r:
            assert r.status == expected_status
            return await r.json()

    assert await health() == {"status": "ok", "serving_backends": 2, "healthy_backends": 2, "total_backends": 2}
    one.healthy = False
    await wait_for(lambda: system.pool.healthy_count == 1, message="remote-1 down")
    assert await health() == {"status": "degraded", "serving_backends": 1, "healthy_backends": 1, "total_backends": 2}
    two.healthy = False
    await wait_for(lambda: system.pool.healthy_count == 0, message="both down")
    # Probes and outer balancers read the code: nothing can be served, so 503.
    assert await health(503) == {"status": "unavailable", "serving_backends": 0, "healthy_backends": 0, "total_backends": 2}
    async with http.head(system.balancer_url + "/health") as r:
        assert r.status == 503


async def test_health_polled_during_an_outage_is_counted_but_never_an_error(
    make_config, start_system, outside_backend, http
) -> None:
    down = await outside_backend("remote-1")
    down.healthy = False
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": down.url}]))
    await wait_for(lambda: system.pool.health_word() == "unavailable", message="the balancer unavailable")
    for _ in range(5):  # an uptime probe, once a second
        async with http.get(system.balancer_url + "/health") as r:
            assert r.status == 503
            assert r.headers["X-Backend"] == "balancer"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert [e for e in stats["recent_errors"] if e["path"] == "/health"] == []
    assert stats["total_errors"] == 0
    async with http.get(system.balancer_url + "/metrics") as r:
        exposition = await r.text()
    assert 'lb_requests_total{backend="balancer",code="503",method="GET"} 5.0' in exposition
    assert "lb_errors_total{" not in exposition
    async with http.get(system.balancer_url + "/tasks") as r:
        assert r.status == 503, "a proxied request's 503 still is an error"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        assert (await r.json())["total_errors"] == 1


async def test_health_counts_disabled_and_draining_backends_as_not_serving(
    make_config, start_system, http, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", "health-test-token")
    auth = {"Authorization": "Bearer health-test-token"}
    system = await start_system(make_config())
    url = system.balancer_url

    async def health(expected_status: int) -> dict:
        async with http.get(url + "/health") as r:
            assert r.status == expected_status
            return await r.json()

    async with http.post(url + "/admin/backends/backend-1/disable", headers=auth) as r:
        assert r.status == 200
    assert await health(200) == {"status": "degraded", "serving_backends": 1, "healthy_backends": 2, "total_backends": 2}
    async with http.post(url + "/admin/backends/backend-2/drain", headers=auth) as r:
        assert r.status == 200
    # Both still pass their checks, yet every request would get 503.
    assert await health(503) == {"status": "unavailable", "serving_backends": 0, "healthy_backends": 2, "total_backends": 2}
    async with http.get(url + "/tasks") as r:
        assert r.status == 503


async def test_every_backend_is_checked_before_the_first_request(make_config, start_system, outside_backend, http) -> None:
    alive = await outside_backend("alive")
    dead = await outside_backend("dead")
    await dead.stop()
    config = make_config(
        backends=[{"name": "alive", "url": alive.url}, {"name": "dead", "url": dead.url}],
        health={"interval": 60.0},  # no second round during this test
    )
    system = await start_system(config)
    async with http.get(system.balancer_url + "/status") as r:
        status = await r.json()
    by_name = {b["name"]: b for b in status["backends"]}
    assert by_name["alive"]["healthy"] is True and by_name["alive"]["last_check"] is not None
    assert by_name["dead"]["healthy"] is False and by_name["dead"]["last_error"] == "connection refused"
    assert status["healthy"] == 1 and status["total"] == 2
    for _ in range(4):
        async with http.get(system.balancer_url + "/x") as r:
            assert r.status == 200 and r.headers["X-Backend"] == "alive"


async def test_status_lists_every_backend_with_its_fields(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/status") as r:
        status = await r.json()
    assert status["strategy"] == "round_robin"
    assert (status["healthy"], status["total"]) == (2, 2)
    for backend, name in zip(status["backends"], ["backend-1", "backend-2"]):
        assert backend["name"] == name
        assert backend["hosted"] is True
        assert backend["url"] == system.hosted[name].url
        assert backend["healthy"] is True
        assert re.fullmatch(r"\d{4}-.*Z", backend["last_check"])
        assert isinstance(backend["last_check_ms"], float)
        assert backend["consecutive_failures"] == 0
        assert backend["last_error"] is None
        assert backend["requests"] == 0 and backend["active_requests"] == 0


async def test_stopped_backend_goes_down_gets_no_traffic_and_comes_back(
    make_config, start_system, outside_backend, http, caplog
) -> None:
    one, two = await outside_backend("remote-1"), await outside_backend("remote-2")
    config = make_config(
        backends=[{"name": "remote-1", "url": one.url}, {"name": "remote-2", "url": two.url}],
        health={**FAST_HEALTH, "rise": 2, "fall": 2},
    )
    system = await start_system(config)
    remote_2 = system.pool.get("remote-2")
    with caplog.at_level(logging.INFO, logger="lb_system"):
        await two.stop()
        await wait_for(lambda: not remote_2.healthy, message="remote-2 down")
        hits = one.hits
        for _ in range(6):
            async with http.get(system.balancer_url + "/any") as r:
                assert r.status == 200 and r.headers["X-Backend"] == "remote-1"
        assert one.hits == hits + 6
        await two.start()
        await wait_for(lambda: remote_2.healthy, message="remote-2 up again")
    assert remote_2.transitions[-1].to == "up"
    down = [r for r in caplog.records if r.levelno == logging.WARNING and "backend down" in r.getMessage()]
    up = [r for r in caplog.records if r.levelno == logging.INFO and "backend up" in r.getMessage()]
    assert any(fields_of(r)["backend"] == "remote-2" and "connection refused" in str(fields_of(r)["reason"]) for r in down)
    assert any(fields_of(r)["backend"] == "remote-2" for r in up)
    async with http.get(system.balancer_url + "/status") as r:
        backend = (await r.json())["backends"][1]
    assert backend["healthy"] is True and backend["consecutive_failures"] == 0


async def test_rise_and_fall_need_consecutive_checks(make_config, start_system, outside_backend) -> None:
    remote = await outside_backend("remote-1")
    config = make_config(backends=[{"name": "remote-1", "url": remote.url}], health={"interval": 60.0, "rise": 2, "fall": 3})
    system = await start_system(config)
    backend, checker = system.pool.get("remote-1"), system.balancer.health_checker
    assert backend.healthy
    remote.healthy = False
    await checker.check_once()
    await checker.check_once()
    assert backend.healthy, "two failures must not take it down with fall=3"
    await checker.check_once()
    assert not backend.healthy
    remote.healthy = True
    await checker.check_once()
    assert not backend.healthy, "one success must not bring it up with rise=2"
    await checker.check_once()
    assert backend.healthy


async def test_no_backend_up_is_503_with_retry_after(make_config, start_system, outside_backend, http) -> None:
    remote = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": remote.url}]))
    await remote.stop()
    await wait_for(lambda: system.pool.healthy_count == 0, message="all down")
    async with http.get(system.balancer_url + "/tasks") as r:
        assert r.status == 503
        assert r.content_type == PROBLEM
        assert int(r.headers["Retry-After"]) >= 1
        assert (await json_of(r))["detail"] == "No healthy backend available"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["error_types"]["503_SERVICE_UNAVAILABLE"] == 1
    assert stats["by_server"] == {"balancer": 1}


async def test_get_fails_over_without_client_visible_errors(make_config, start_system, outside_backend, http) -> None:
    one, two = await outside_backend("remote-1"), await outside_backend("remote-2")
    config = make_config(
        backends=[{"name": "remote-1", "url": one.url}, {"name": "remote-2", "url": two.url}],
        health={"interval": 60.0},  # only the proxy can notice: no active check in between
    )
    system = await start_system(config)
    await two.stop()
    for _ in range(8):
        async with http.get(system.balancer_url + "/tasks") as r:
            assert r.status == 200
            assert r.headers["X-Backend"] == "remote-1"
    remote_2 = system.pool.get("remote-2")
    assert remote_2.ejections == 1, "failed forwards eject it (they are not failed checks)"
    assert remote_2.consecutive_failures == 0
    assert remote_2.last_error == "connection refused"


async def test_post_is_retried_only_when_the_connection_was_never_made(make_config, start_system, outside_backend, http) -> None:
    one, two = await outside_backend("remote-1"), await outside_backend("remote-2")
    system = await start_system(
        make_config(
            backends=[{"name": "remote-1", "url": one.url}, {"name": "remote-2", "url": two.url}],
            health={"interval": 60.0},
        )
    )
    await one.stop()  # refused: nothing was sent, so even a POST may go elsewhere
    for _ in range(4):
        async with http.post(system.balancer_url + "/tasks", json={"title": "x"}) as r:
            assert r.status == 200
            assert r.headers["X-Backend"] == "remote-2"


async def test_nothing_answering_is_502(make_config, start_system, outside_backend, http) -> None:
    one, two = await outside_backend("remote-1"), await outside_backend("remote-2")
    system = await start_system(
        make_config(
            backends=[{"name": "remote-1", "url": one.url}, {"name": "remote-2", "url": two.url}],
            health={"interval": 60.0, "passive_fall": 0, "fall": 100},
        )
    )
    await one.stop()
    await two.stop()
    async with http.get(system.balancer_url + "/tasks") as r:
        assert r.status == 502
        assert r.content_type == PROBLEM
        assert "connection refused" in (await json_of(r))["detail"]
    async with http.get(system.balancer_url + "/errors/stats") as r:
        stats = await r.json()
    assert stats["error_types"]["502_BAD_GATEWAY"] == 1


@pytest.fixture
async def dropper() -> AsyncIterator[ScriptedServer]:
    """A backend whose health check passes and that cuts every other request before answering."""
    server = await ScriptedServer.start(then=on_path("/health", answer(body=b'{"status": "ok"}'), hang_up))
    yield server
    await server.close()


@pytest.fixture
async def dropper_and_good(dropper, outside_backend, make_config, start_system):
    good = await outside_backend("good")
    system = await start_system(
        make_config(
            backends=[{"name": "dropper", "url": dropper.url}, {"name": "good", "url": good.url}], health={"interval": 60.0}
        )
    )
    return system, good, dropper


def dropped(dropper: ScriptedServer) -> int:
    """How many requests the dropper cut (its health checks aside)."""
    return sum(1 for r in dropper.requests if r.target != "/health")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_idempotent_request_dropped_mid_exchange_is_retried_elsewhere(method, dropper_and_good, http) -> None:
    system, good, dropper = dropper_and_good
    for _ in range(2):
        async with http.request(method, system.balancer_url + "/tasks/1", json={"title": "x"}) as r:
            assert r.status == 200
            assert r.headers["X-Backend"] == "good"
    assert dropped(dropper) >= 1, "the dropper was tried first at least once"
    assert good.hits == 2


async def test_post_dropped_mid_exchange_is_not_retried(dropper_and_good, http) -> None:
    system, good, dropper = dropper_and_good
    statuses = []
    for _ in range(2):
        async with http.post(system.balancer_url + "/tasks", json={"title": "x"}) as r:
            statuses.append((r.status, r.headers.get("X-Backend")))
    assert (502, "balancer") in statuses, "the dropped POST must not be replayed on another backend"
    assert good.hits == 1
    assert dropped(dropper) == 1


async def test_the_balancer_reuses_keep_alive_connections(make_config, start_system, outside_backend, http) -> None:
    remote = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": remote.url}], health={"interval": 60.0}))
    for _ in range(10):
        async with http.get(system.balancer_url + "/x") as r:
            assert r.status == 200
    assert len(remote.peers) <= 2, f"10 sequential requests opened {len(remote.peers)} connections"


async def test_odd_query_numbers_are_400_not_500(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    for raw in ("%C2%B2", "1" * 5000):
        async with http.get(system.balancer_url + f"/errors/stats?limit={raw}") as r:
            assert r.status == 400
            assert "'limit'" in (await r.json(content_type=None))["detail"]


async def test_a_path_with_an_encoded_newline_is_still_forwarded(make_config, start_system, outside_backend, http) -> None:
    remote = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": remote.url}]))
    async with http.get(system.balancer_url + "/files/a%0Ab") as r:
        assert r.status == 200
        assert r.headers["X-Backend"] == "remote-1"


@pytest.mark.parametrize("port_of", ["balancer", "backend-1"])
async def test_a_burst_of_connections_is_queued_not_dropped_while_the_loop_is_busy(make_config, start_system, port_of) -> None:
    """With aiohttp's default backlog (128) the kernel drops the rest of a burst of new
    connections and each waits a SYN retransmit (1 s) before its first byte is even read."""
    system = await start_system(make_config())
    url = system.balancer_url if port_of == "balancer" else system.hosted[port_of].url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    burst = 400
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    if somaxconn.exists() and int(somaxconn.read_text()) < burst:
        pytest.skip(f"the kernel caps every backlog at net.core.somaxconn = {somaxconn.read_text().strip()}")
    sockets = [socket.socket() for _ in range(burst)]
    try:
        # No await below: the event loop is busy (here: blocked), so nothing is accepted yet.
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex((host, int(port)))
        pending, connected = set(sockets), 0
        deadline = asyncio.get_running_loop().time() + 0.5
        while pending and (left := deadline - asyncio.get_running_loop().time()) > 0:
            _, writable, _ = select.select([], list(pending), [], left)
            for sock in writable:
                pending.discard(sock)
                connected += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert connected == burst
    finally:
        for sock in sockets:
            sock.close()
