"""Routes and pools over real sockets: requests sorted by host and by path prefix into pools of
outside backends, strip_prefix, the balancer's own 404 for an unrouted request, retries and
"no healthy backend" within a pool, and what /status, /health, /metrics, the access line and
/errors/stats say about pools and routes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from support.backends import FakeBackend
from support.config_files import FAST_HEALTH
from support.waiting import wait_for

from lb_system import System


async def get(http: aiohttp.ClientSession, system: System, path: str, host: str | None = None) -> tuple[int, str, Any]:
    """(status, X-Backend, JSON body) of a GET through the balancer, with `host` as the Host header."""
    headers = {"Host": host} if host is not None else {}
    async with http.get(system.balancer_url + path, headers=headers) as response:
        body = await response.json(content_type=None)
        return response.status, response.headers["X-Backend"], body


async def start_two_pools(outside_backend, make_config, start_system, **sections: Any) -> tuple[System, FakeBackend, FakeBackend]:
    api, web = await outside_backend("api-1"), await outside_backend("web-1", misbehaves=False)
    config = make_config(
        backends=[{"name": "api-1", "url": api.url, "pool": "api"}, {"name": "web-1", "url": web.url}], **sections
    )
    return await start_system(config), api, web


async def test_two_pools_by_host_exact_and_wildcard(outside_backend, make_config, start_system, http) -> None:
    system, _, _ = await start_two_pools(
        outside_backend, make_config, start_system, routes=[{"host": "*.api.example.com", "pool": "api"}]
    )
    assert (await get(http, system, "/x", "eu.api.example.com:8080"))[1] == "api-1"
    assert (await get(http, system, "/x", "EU.Shop.API.example.com"))[1] == "api-1"
    assert (await get(http, system, "/x", "api.example.com"))[1] == "web-1"  # the bare domain is no subdomain
    assert (await get(http, system, "/x"))[1] == "web-1"  # unrouted: the default pool


async def test_two_pools_by_path_prefix_with_strip_prefix(outside_backend, make_config, start_system, http) -> None:
    system, api, web = await start_two_pools(
        outside_backend,
        make_config,
        start_system,
        routes=[{"path_prefix": "/api", "strip_prefix": True, "pool": "api"}, {"path_prefix": "/static", "pool": "api"}],
    )
    status, backend, body = await get(http, system, "/api/items?x=1")
    assert (status, backend, body["path"]) == (200, "api-1", "/items?x=1")
    assert (await get(http, system, "/api"))[2]["path"] == "/"
    assert (await get(http, system, "/api?q=2"))[2]["path"] == "/?q=2"
    status, backend, body = await get(http, system, "/static/a.css")
    assert (backend, body["path"]) == ("api-1", "/static/a.css")  # no strip_prefix: as sent
    status, backend, body = await get(http, system, "/apix")  # not on a segment boundary
    assert (backend, body["path"]) == ("web-1", "/apix")
    assert web.hits == 1 and api.hits == 4


async def test_an_unrouted_request_without_a_default_pool_is_the_balancers_404(
    outside_backend, make_config, start_system, http, lb_log
) -> None:
    api = await outside_backend("api-1", misbehaves=False)
    system = await start_system(
        make_config(backends=[{"name": "api-1", "url": api.url, "pool": "api"}], routes=[{"path_prefix": "/api", "pool": "api"}])
    )
    async with http.get(system.balancer_url + "/nowhere", headers={"X-Request-ID": "unrouted-1"}) as response:
        assert response.status == 404 and response.headers["X-Backend"] == "balancer"
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)
    assert problem["detail"] == "No route for this request" and problem["request_id"] == "unrouted-1"
    assert api.hits == 0
    async with http.get(system.balancer_url + "/errors/stats") as response:
        stats = await response.json()
    assert stats["by_server"] == {"balancer": 1}
    (record,) = stats["recent_errors"]
    assert (record["server"], record["pool"], record["route"], record["status"]) == ("balancer", None, "-", 404)
    (line,) = [m for m in lb_log.messages() if m.startswith("access") and "unrouted-1" in m]
    assert "status=404" in line and "reason=no_route" in line and "pool=- route=-" in line
    status, backend, _ = await get(http, system, "/api/x")
    assert (status, backend) == (200, "api-1")
    # The empty default pool serves nothing: it is not listed, nor "unavailable".
    async with http.get(system.balancer_url + "/health") as response:
        health = await response.json()
    assert response.status == 200 and health["status"] == "ok"
    assert list(health["pools"]) == ["api"]
    async with http.get(system.balancer_url + "/status") as response:
        assert [pool["name"] for pool in (await response.json())["pools"]] == ["api"]


async def test_no_healthy_backend_and_retries_stay_within_the_pool(outside_backend, make_config, start_system, http) -> None:
    api_1, api_2 = await outside_backend("api-1"), await outside_backend("api-2")
    web = await outside_backend("web-1", misbehaves=False)
    system = await start_system(
        make_config(
            backends=[
                {"name": "api-1", "url": api_1.url, "pool": "api"},
                {"name": "api-2", "url": api_2.url, "pool": "api"},
                {"name": "web-1", "url": web.url},
            ],
            routes=[{"path_prefix": "/api", "pool": "api", "strip_prefix": True}],
        )
    )
    # A 503 from one api backend is retried on the other api backend, never on web-1.
    async with http.get(system.balancer_url + "/api/code/503") as response:
        assert response.status == 503 and response.headers["X-Backend"] in ("api-1", "api-2")
    assert web.hits == 0 and api_1.hits == api_2.hits == 1
    await api_1.stop()
    await api_2.stop()
    pool = system.pool
    assert pool is not None
    await wait_for(lambda: pool.serving_count == 1, message="the api pool down")
    async with http.get(system.balancer_url + "/api/x") as response:
        assert response.status == 503 and response.headers["X-Backend"] == "balancer"
        assert (await response.json(content_type=None))["detail"] == "No healthy backend available"
    assert web.hits == 0
    assert (await get(http, system, "/other"))[1] == "web-1"
    async with http.get(system.balancer_url + "/health") as response:
        health = await response.json()
    assert response.status == 200 and health["status"] == "degraded"
    assert health["pools"] == {
        "default": {"status": "ok", "serving_backends": 1, "healthy_backends": 1, "total_backends": 1},
        "api": {"status": "unavailable", "serving_backends": 0, "healthy_backends": 0, "total_backends": 2},
    }


async def test_status_metrics_access_line_and_errors_name_pool_and_route(
    outside_backend, make_config, start_system, http, lb_log
) -> None:
    system, _, _ = await start_two_pools(
        outside_backend,
        make_config,
        start_system,
        routes=[{"host": "api.example.com", "path_prefix": "/v1", "pool": "api", "strip_prefix": True}],
        pools={"api": {"strategy": "least_connections", "health": {"path": "/health", "rise": 2}}},
    )
    async with http.get(system.balancer_url + "/v1/code/500", headers={"Host": "api.example.com", "X-Request-ID": "r-1"}) as r:
        assert r.status == 500 and r.headers["X-Backend"] == "api-1"
    async with http.get(system.balancer_url + "/status") as response:
        status = await response.json()
    assert [(b["name"], b["pool"]) for b in status["backends"]] == [("api-1", "api"), ("web-1", "default")]
    pools = {p["name"]: p for p in status["pools"]}
    assert pools["api"]["strategy"] == "least_connections" and pools["default"]["strategy"] == "round_robin"
    assert (pools["api"]["status"], pools["api"]["backends"]) == ("ok", ["api-1"])
    assert (pools["default"]["status"], pools["default"]["backends"]) == ("ok", ["web-1"])
    async with http.get(system.balancer_url + "/errors/stats") as response:
        (record,) = (await response.json())["recent_errors"]
    assert (record["server"], record["pool"], record["route"]) == ("api-1", "api", "api.example.com/v1")
    (line,) = [m for m in lb_log.messages() if m.startswith("access") and "request_id=r-1" in m]
    assert "backend=api-1" in line and "pool=api route=api.example.com/v1" in line
    async with http.get(system.balancer_url + "/metrics") as response:
        exposition = await response.text()
    assert 'lb_requests_total{backend="api-1",code="500",method="GET",pool="api"} 1.0' in exposition
    assert 'lb_backend_up{backend="web-1",pool="default"} 1.0' in exposition
    assert 'lb_errors_total{backend="api-1",code="500",pool="api",type="500_INTERNAL_ERROR"} 1.0' in exposition


async def test_a_single_pool_config_names_no_pool_where_it_did_not_before(make_config, start_system, http, lb_log) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/tasks", headers={"X-Request-ID": "plain-1"}) as response:
        assert response.status == 200
    async with http.get(system.balancer_url + "/health") as response:
        assert "pools" not in await response.json()
    async with http.get(system.balancer_url + "/metrics") as response:
        assert "pool=" not in await response.text()
    (line,) = [m for m in lb_log.messages() if m.startswith("access") and "plain-1" in m]
    assert "pool=" not in line and "route=" not in line
    async with http.get(system.balancer_url + "/status") as response:
        status = await response.json()
    assert [p["name"] for p in status["pools"]] == ["default"] and {b["pool"] for b in status["backends"]} == {"default"}


async def test_each_pool_balances_with_its_own_strategy(outside_backend, make_config, start_system, http) -> None:
    backends = [await outside_backend(f"api-{n}", misbehaves=False) for n in (1, 2, 3)]
    web_1, web_2 = await outside_backend("web-1", misbehaves=False), await outside_backend("web-2", misbehaves=False)
    config = make_config(
        backends=[{"name": b.name, "url": b.url, "pool": "api"} for b in backends]
        + [{"name": "web-1", "url": web_1.url}, {"name": "web-2", "url": web_2.url}],
        routes=[{"path_prefix": "/api", "pool": "api"}],
        pools={"api": {"strategy": "consistent_hash", "hash_on": "header:X-User"}},
        health=FAST_HEALTH,
    )
    system = await start_system(config)
    seen = set()
    for _ in range(6):
        async with http.get(system.balancer_url + "/api/x", headers={"X-User": "alice"}) as response:
            seen.add(response.headers["X-Backend"])
    assert len(seen) == 1  # one user, one backend of the api pool
    web = [(await get(http, system, "/page"))[1] for _ in range(4)]
    assert web == ["web-1", "web-2", "web-1", "web-2"]  # the default pool round robin


async def test_a_reload_applies_routes_and_pools_keeping_each_backends_state(
    config_file, start_system, outside_backend, http
) -> None:
    one, two = await outside_backend("one"), await outside_backend("two")
    plain = [{"name": "one", "url": one.url}, {"name": "two", "url": two.url}]
    config_file.write(backends=plain)
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    pools = system.pool
    assert pools is not None
    for _ in range(4):
        await get(http, system, "/x")
    moved = pools.get("two")
    assert moved is not None and moved.requests == 2
    transitions = len(moved.transitions)

    config_file.write(
        backends=[plain[0], {**plain[1], "pool": "api"}],
        pools={"api": {"strategy": "least_connections", "health": {"interval": 0.5}}},
        routes=[{"path_prefix": "/api", "pool": "api", "strip_prefix": True}],
    )
    await wait_for(lambda: pools.routed, message="the routes applied")
    assert pools.get("two") is moved and moved.pool == "api" and moved.requests == 2 and moved.eligible
    assert len(moved.transitions) == transitions  # still up: no flap through the move
    assert pools["api"].strategy.name == "least_connections" and pools["api"].health.interval == 0.5
    assert [(await get(http, system, "/api/items"))[1:] for _ in range(2)] == [("two", ANY_ECHO), ("two", ANY_ECHO)]
    assert {(await get(http, system, "/x"))[1] for _ in range(3)} == {"one"}
    assert (await get(http, system, "/api/items"))[2]["path"] == "/items"

    # Back to one pool and no route: every path reaches both again, and two's counters carry on.
    config_file.write(backends=plain, routes=[], pools={"api": {}})
    await wait_for(lambda: not pools.routed, message="back to one pool")
    assert pools.get("two") is moved and moved.pool == "default" and moved.requests == 5
    assert {(await get(http, system, "/api/items"))[1] for _ in range(4)} == {"one", "two"}


class _AnyEcho:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict)


ANY_ECHO = _AnyEcho()


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"routes": [{"path_prefix": "/api", "pool": "nobody"}]}, "[[routes]] #1 pool: pool 'nobody' has no backends"),
        ({"routes": [{"path_prefix": "/api"}]}, "[[routes]] #1 pool: Field required"),
        ({"routes": [{"pool": "api", "host": "a:1"}]}, "[[routes]] #1 host"),
        ({"routes": [{"pool": "api", "path_prefix": "api"}]}, "[[routes]] #1 path_prefix"),
        ({"routes": [{"pool": "api", "strip_prefix": "yes"}]}, "[[routes]] #1 strip_prefix"),
        ({"routes": [{"pool": "api", "colour": "red"}]}, "[[routes]] #1 colour: unknown key"),
        ({"routes": [{"pool": "api"}, {"pool": "api", "path_prefix": "/"}]}, "[[routes]] #2: duplicate of route #1"),
        ({"pools": {"api": {"strategy": "fastest"}}}, "[pools.api] strategy"),
        ({"pools": {"api": {"hash_on": "cookie"}}}, "[pools.api] hash_on"),
        ({"pools": {"api": {"sticky_cookie": "a b"}}}, "[pools.api] sticky_cookie"),
        ({"pools": {"api": {"slow_start": -1.0}}}, "[pools.api] slow_start"),
        ({"pools": {"api": {"health": {"interval": 0.001}}}}, "[pools.api.health] interval"),
        ({"pools": {"api": {"health": {"expect_status": "999"}}}}, "[pools.api.health] expect_status"),
        ({"pools": {"api": {"colour": 1}}}, "[pools.api] colour: unknown key"),
        ({"backend_pool": "bad name"}, "[[backends]] #2 (two) pool"),
    ],
)
async def test_a_bad_route_or_pool_edit_is_refused_and_the_old_routes_keep_serving(
    config_file, start_system, outside_backend, http, edit: dict[str, Any], key: str
) -> None:
    one, two = await outside_backend("one"), await outside_backend("two")
    backends = [{"name": "one", "url": one.url}, {"name": "two", "url": two.url, "pool": "api"}]
    routes = [{"path_prefix": "/api", "pool": "api", "strip_prefix": True}]
    config_file.write(backends=backends, routes=routes)
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    running = system.config
    pool_name = edit.pop("backend_pool", None)
    if pool_name is not None:
        edit["backends"] = [backends[0], {**backends[1], "pool": pool_name}]
    config_file.write(**edit)
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    assert key in system.config_error and "\n" not in system.config_error and system.config is running
    status, backend, body = await get(http, system, "/api/items")
    assert (status, backend, body["path"]) == (200, "two", "/items")
    assert (await get(http, system, "/x"))[1] == "one"


async def test_each_pool_has_its_own_retry_budget(outside_backend, make_config, start_system, http, lb_log) -> None:
    first, second = await outside_backend("first"), await outside_backend("second")
    web_a, web_b = await outside_backend("web-a"), await outside_backend("web-b")
    system = await start_system(
        make_config(
            backends=[
                {"name": "first", "url": first.url, "pool": "api", "weight": 100},  # every first try; retries go to second
                {"name": "second", "url": second.url, "pool": "api"},
                {"name": "web-a", "url": web_a.url},
                {"name": "web-b", "url": web_b.url},
            ],
            routes=[{"path_prefix": "/api", "pool": "api", "strip_prefix": True}],
            proxy={"retry_budget_percent": 0},  # only the floor: 3 retries at a time
            health={"interval": 60.0},
        )
    )
    held = [asyncio.create_task(http.get(system.balancer_url + "/api/flaky?s=10")) for _ in range(4)]
    await wait_for(lambda: second.active == 3 and first.hits == 4, message="the api pool's budget spent")
    # The api pool's budget is spent; the default pool's is whole: its 503 is retried on the other backend.
    async with http.get(system.balancer_url + "/code/503", headers={"X-Request-ID": "web-retry"}) as response:
        assert response.status == 503
    (line,) = [m for m in lb_log.messages() if m.startswith("access") and "web-retry" in m]
    assert re.search(r"tries=web-[ab]:503,web-[ab]:503 ", line), line
    second.release.set()
    statuses = []
    for task in held:
        async with await task as response:
            statuses.append(response.status)
    assert sorted(statuses) == [200, 200, 200, 503]
