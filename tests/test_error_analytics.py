"""GET /errors/stats analytics over real sockets: windows, top paths by route pattern, by_method,
and the recent_errors filters with their 400s."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from support.waiting import wait_for

SEED_KEYS = ["total_errors", "error_types", "by_server", "recent_errors", "since"]


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with http.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


async def stats(http: aiohttp.ClientSession, url: str, query: str = "") -> dict[str, Any]:
    async with http.get(url + "/errors/stats" + query) as response:
        assert response.status == 200
        return await response.json()


@pytest.fixture
async def provoked(make_config, start_system, http) -> str:
    """A system with a known set of errors: 404s on three task ids, a 500, a 400, a 405, a direct 404."""
    system = await start_system(make_config())
    url = system.balancer_url
    for task_id in (910001, 910002, 910003):
        assert await call(http, "GET", f"{url}/tasks/{task_id}") == 404
    assert await call(http, "DELETE", f"{url}/tasks/910004") == 404
    assert await call(http, "GET", f"{url}/debug/crash") == 500
    assert await call(http, "POST", f"{url}/tasks", data=b"{}", headers={"Content-Type": "application/json"}) == 400
    assert await call(http, "PUT", f"{url}/status") == 405
    assert await call(http, "GET", f"{url}/nowhere/77") == 404
    assert await call(http, "GET", system.hosted["backend-2"].url + "/tasks/910005") == 404
    return url


async def test_seed_fields_stay_and_the_new_ones_are_added(provoked: str, http) -> None:
    body = await stats(http, provoked)
    assert list(body)[:5] == SEED_KEYS
    assert {"windows", "top_paths", "by_method"} <= set(body)
    assert body["total_errors"] == 9


async def test_windows_count_what_just_happened_by_type(provoked: str, http) -> None:
    windows = (await stats(http, provoked))["windows"]
    assert set(windows) == {"1m", "5m", "15m"}
    for window in windows.values():  # all of it happened within the last minute
        assert window["total"] == 9
        assert window["by_type"] == {
            "400_BAD_REQUEST": 1,
            "404_NOT_FOUND": 6,
            "405_METHOD_NOT_ALLOWED": 1,
            "500_INTERNAL_ERROR": 1,
        }


async def test_top_paths_group_task_ids_under_the_route_pattern(provoked: str, http) -> None:
    top = (await stats(http, provoked))["top_paths"]
    assert top[0] == {"path": "/tasks/{id}", "count": 5}
    paths = {entry["path"]: entry["count"] for entry in top}
    assert paths["/debug/crash"] == 1 and paths["/tasks"] == 1 and paths["/status"] == 1
    assert paths["/nowhere/77"] == 1  # no route matched: the raw path
    assert not any(path.startswith("/tasks/9") for path in paths)
    assert len(top) <= 10


async def test_by_method_and_by_server(provoked: str, http) -> None:
    body = await stats(http, provoked)
    assert body["by_method"] == {"DELETE": 1, "GET": 6, "POST": 1, "PUT": 1}
    assert body["by_server"]["balancer"] == 1
    assert sum(body["by_server"].values()) == 9


async def test_recent_errors_filter_by_server_status_and_limit(provoked: str, http) -> None:
    only_404 = (await stats(http, provoked, "?status=404"))["recent_errors"]
    assert len(only_404) == 6 and {e["status"] for e in only_404} == {404}
    balancer = (await stats(http, provoked, "?server=balancer"))["recent_errors"]
    assert [(e["status"], e["path"]) for e in balancer] == [(405, "/status")]
    limited = (await stats(http, provoked, "?status=404&limit=2"))["recent_errors"]
    assert limited == only_404[:2]  # the newest two
    assert limited[0]["path"] == "/tasks/910005"
    combined = (await stats(http, provoked, "?server=backend-2&status=404&limit=20"))["recent_errors"]
    assert combined and all(e["server"] == "backend-2" and e["status"] == 404 for e in combined)
    nobody = await stats(http, provoked, "?server=no-such-server")
    assert nobody["recent_errors"] == [] and nobody["total_errors"] == 9  # filters touch only the list


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?status=abc", "status"),
        ("?status=200", "status"),
        ("?status=600", "status"),
        ("?limit=0", "limit"),
        ("?limit=-3", "limit"),
        ("?limit=many", "limit"),
        ("?server=", "server"),
    ],
)
async def test_a_bad_filter_is_a_400_naming_it(provoked: str, http, query: str, named: str) -> None:
    async with http.get(provoked + "/errors/stats" + query) as response:
        assert response.status == 400
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = await response.json()
    assert f"'{named}'" in problem["detail"]


async def test_the_balancers_own_errors_on_a_hosted_route_are_grouped_under_its_pattern(
    make_config, start_system, http, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", "analytics-test-token")
    system = await start_system(make_config())
    url = system.balancer_url
    assert await call(http, "GET", f"{url}/tasks/920001") == 404  # the backend's own: grouped by its router
    for name in ("backend-1", "backend-2"):
        auth = {"Authorization": "Bearer analytics-test-token"}
        assert await call(http, "POST", f"{url}/admin/backends/{name}/disable", headers=auth) == 200
    for path in ("/tasks/1", "/tasks/2", "/tasks", "/nowhere/5"):
        assert await call(http, "GET", url + path) == 503  # the balancer's own: no backend serves
    body = await stats(http, url)
    paths = {entry["path"]: entry["count"] for entry in body["top_paths"]}
    assert paths == {"/tasks/{id}": 3, "/tasks": 1, "/nowhere/5": 1}
    assert body["by_server"] == {"backend-1": 1, "balancer": 4} or body["by_server"] == {"backend-2": 1, "balancer": 4}
    assert [e["path"] for e in body["recent_errors"][:2]] == ["/nowhere/5", "/tasks"]  # records keep the raw path


async def test_without_hosted_backends_the_balancers_errors_keep_the_raw_path(
    make_config, start_system, outside_backend, http
) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "outside", "url": outside.url}]))
    await outside.stop()
    await wait_for(lambda: not system.pool.backends[0].healthy, message="the outside backend down")
    assert await call(http, "GET", system.balancer_url + "/tasks/1") == 503
    assert (await stats(http, system.balancer_url))["top_paths"] == [{"path": "/tasks/1", "count": 1}]
