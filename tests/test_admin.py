"""The admin API under /admin/: authorisation, backend actions, reload, resetting error counters."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
import yarl
from support.waiting import refused, wait_for

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    return TOKEN


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = AUTH) -> tuple[int, dict]:
    async with http.post(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def backend_status(http: aiohttp.ClientSession, system, name: str) -> dict:
    async with http.get(system.balancer_url + "/status") as response:
        body = await response.json()
    return next(b for b in body["backends"] if b["name"] == name)


# --- authorisation -------------------------------------------------------------------------


async def test_without_a_token_every_admin_request_gets_403_naming_the_variable(
    make_config, start_system, http, monkeypatch
) -> None:
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    system = await start_system(make_config())
    for method, path in [
        ("POST", "/admin/reload"),
        ("POST", "/admin/backends/backend-1/disable"),
        ("GET", "/admin/x"),
        ("DELETE", "/errors/stats"),
    ]:
        async with http.request(method, system.balancer_url + path, headers=AUTH) as response:
            assert response.status == 403, path
            assert response.content_type == "application/problem+json"
            detail = (await response.json())["detail"]
            assert "LB_ADMIN_TOKEN" in detail and "export LB_ADMIN_TOKEN=" in detail
    assert system.pool.get("backend-1").admin_state == "enabled"


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        (None, 'Bearer realm="lb_system"'),
        ({"Authorization": "Bearer wrong"}, 'Bearer realm="lb_system", error="invalid_token"'),
        ({"Authorization": f"Basic {TOKEN}"}, 'Bearer realm="lb_system", error="invalid_token"'),
    ],
)
async def test_a_wrong_or_missing_token_gets_401_with_a_bearer_challenge(
    make_config, start_system, http, admin_token, headers, challenge
) -> None:
    system = await start_system(make_config())
    async with http.post(system.balancer_url + "/admin/backends/backend-1/disable", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == challenge
        assert response.content_type == "application/problem+json"
    assert system.pool.get("backend-1").admin_state == "enabled"


async def test_token_env_names_another_variable(make_config, start_system, http, monkeypatch) -> None:
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("MY_LB_TOKEN", "other")
    system = await start_system(make_config(admin={"token_env": "MY_LB_TOKEN"}))
    status, _ = await post(http, system.balancer_url + "/admin/backends/backend-1/disable", {"Authorization": "Bearer other"})
    assert status == 200


async def test_admin_requests_are_logged_without_the_token(make_config, start_system, http, admin_token, lb_log) -> None:
    system = await start_system(make_config())
    await post(http, system.balancer_url + "/admin/backends/backend-2/disable")
    await post(http, system.balancer_url + "/admin/backends/backend-2/disable", {"Authorization": "Bearer nope"})
    lines = [m for m in lb_log.messages() if m.startswith("admin ")]
    assert lines == [
        "admin action=disable target=backend-2 client=127.0.0.1 result=200",
        "admin action=disable target=backend-2 client=127.0.0.1 result=401",
    ]
    assert not any(TOKEN in m or "nope" in m for m in lb_log.messages(logging.DEBUG))


async def test_admin_paths_are_never_forwarded(make_config, start_system, http, admin_token) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/admin/nothing-here", headers=AUTH) as response:
        assert response.status == 404 and response.headers["X-Backend"] == "balancer"
    async with http.get(system.balancer_url + "/admin/reload", headers=AUTH) as response:
        assert response.status == 405 and response.headers["Allow"] == "POST"
    async with http.post(system.balancer_url + "/admin/backends/backend-1/explode", headers=AUTH) as response:
        assert response.status == 404


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/a%0Ab", "/admin/%2e%2e/tasks", "/admin/backends/x/drain"])
async def test_every_path_under_admin_needs_the_token_and_is_never_forwarded(
    make_config, start_system, http, admin_token, path
) -> None:
    system = await start_system(make_config())
    async with http.get(yarl.URL(system.balancer_url + path, encoded=True)) as response:
        assert response.status == 401, path
        assert response.headers["X-Backend"] == "balancer"


# --- backend actions -----------------------------------------------------------------------


async def test_unknown_backend_gets_404(make_config, start_system, http, admin_token) -> None:
    system = await start_system(make_config())
    status, body = await post(http, system.balancer_url + "/admin/backends/nope/disable")
    assert status == 404 and body["detail"] == "Backend 'nope' not found"


async def test_stop_and_start_on_an_outside_backend_get_409(
    make_config, start_system, outside_backend, http, admin_token
) -> None:
    remote = await outside_backend("remote")
    system = await start_system(make_config(backends=[{"name": "remote", "url": remote.url}]))
    for action in ("stop", "start"):
        status, body = await post(http, system.balancer_url + f"/admin/backends/remote/{action}")
        assert status == 409 and "outside server" in body["detail"]


async def test_disable_takes_a_backend_out_now_and_in_flight_requests_finish(
    make_config, start_system, gated_backend, http, admin_token
) -> None:
    gated = await gated_backend("remote")
    system = await start_system(make_config(backends=[{"name": "remote", "url": gated.url}, {"name": "backend-1", "port": 0}]))
    slow = asyncio.create_task(http.get(system.balancer_url + "/slow"))
    await wait_for(lambda: gated.active == 1)

    status, body = await post(http, system.balancer_url + "/admin/backends/remote/disable")
    assert status == 200 and body["changed"] is True and body["status"]["admin_state"] == "disabled"
    remote = await backend_status(http, system, "remote")
    assert remote["admin_state"] == "disabled" and remote["healthy"] is True and remote["serving"] is False
    for _ in range(3):
        async with http.get(system.balancer_url + "/x") as response:
            assert response.headers["X-Backend"] == "backend-1"
    gated.release.set()
    response = await slow
    assert response.status == 200 and response.headers["X-Backend"] == "remote"
    response.release()

    status, body = await post(http, system.balancer_url + "/admin/backends/remote/disable")
    assert status == 200 and body["changed"] is False  # idempotent


async def test_enable_brings_a_backend_back_after_a_good_check(
    make_config, start_system, outside_backend, http, admin_token
) -> None:
    remote = await outside_backend("remote")
    system = await start_system(make_config(backends=[{"name": "remote", "url": remote.url}, {"name": "backend-1", "port": 0}]))
    backend = system.pool.get("remote")
    await post(http, system.balancer_url + "/admin/backends/remote/disable")
    checks = backend.checks_ok  # read before: the check the enable wakes may end before its answer is read
    status, body = await post(http, system.balancer_url + "/admin/backends/remote/enable")
    assert status == 200 and body["changed"] is True and body["status"]["admin_state"] == "enabled"
    await wait_for(lambda: backend.eligible, message="remote back in rotation")
    assert backend.checks_ok > checks
    assert (await backend_status(http, system, "remote"))["serving"] is True
    status, body = await post(http, system.balancer_url + "/admin/backends/remote/enable")
    assert status == 200 and body["changed"] is False


async def test_drain_reports_when_the_last_in_flight_request_finished(
    make_config, start_system, gated_backend, http, admin_token
) -> None:
    gated = await gated_backend("remote")
    system = await start_system(make_config(backends=[{"name": "remote", "url": gated.url}, {"name": "backend-1", "port": 0}]))
    slow = [asyncio.create_task(http.get(system.balancer_url + "/slow")) for _ in range(4)]
    await wait_for(lambda: gated.active == 2)  # round robin: two on remote, two on backend-1 (404)
    status, body = await post(http, system.balancer_url + "/admin/backends/remote/drain")
    assert status == 200 and body["status"]["admin_state"] == "draining" and body["status"]["drained_at"] is None
    remote = await backend_status(http, system, "remote")
    assert remote["active_requests"] == 2 and remote["healthy"] is True and remote["serving"] is False
    gated.release.set()
    for task in slow:
        (await task).release()
    await wait_for(lambda: system.pool.get("remote").drained_at is not None)
    remote = await backend_status(http, system, "remote")
    assert remote["admin_state"] == "draining" and remote["drained_at"] is not None and remote["active_requests"] == 0


async def test_drain_of_an_idle_backend_is_drained_at_once(make_config, start_system, http, admin_token) -> None:
    system = await start_system(make_config())
    status, body = await post(http, system.balancer_url + "/admin/backends/backend-1/drain")
    assert status == 200 and body["status"]["drained_at"] is not None


async def test_stop_closes_a_hosted_backend_and_start_reopens_it(make_config, start_system, http, admin_token) -> None:
    system = await start_system(make_config())
    url = system.hosted["backend-2"].url
    backend = system.pool.get("backend-2")

    status, body = await post(http, system.balancer_url + "/admin/backends/backend-2/stop")
    assert status == 200 and body["changed"] is True and body["status"]["listening"] is False
    assert await refused(url)
    await wait_for(lambda: not backend.healthy, message="backend-2 seen down")
    state = await backend_status(http, system, "backend-2")
    assert state["healthy"] is False and state["admin_state"] == "enabled" and state["listening"] is False
    for _ in range(4):
        async with http.get(system.balancer_url + "/tasks") as response:
            assert response.status == 200 and response.headers["X-Backend"] == "backend-1"
    status, body = await post(http, system.balancer_url + "/admin/backends/backend-2/stop")
    assert status == 200 and body["changed"] is False

    status, body = await post(http, system.balancer_url + "/admin/backends/backend-2/start")
    assert status == 200 and body["changed"] is True
    assert system.hosted["backend-2"].url == url  # the same port again
    await wait_for(lambda: backend.healthy, message="backend-2 back up")
    assert (await backend_status(http, system, "backend-2"))["listening"] is True
    status, body = await post(http, system.balancer_url + "/admin/backends/backend-2/start")
    assert status == 200 and body["changed"] is False


# --- reload and error counters ---------------------------------------------------------------


async def test_admin_reload_answers_what_changed_or_the_config_error(config_file, start_system, http, admin_token) -> None:
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=3600)
    config_file.write(backends=[*config_file.data["backends"], {"name": "backend-3", "port": 0}], errors={"recent": 5})
    status, body = await post(http, system.balancer_url + "/admin/reload")
    assert status == 200
    assert body["added"] == ["backend-3"] and body["settings"] == ["[errors] recent: 50 -> 5"] and body["changed"]
    assert system.pool.get("backend-3") is not None

    status, body = await post(http, system.balancer_url + "/admin/reload")
    assert status == 200 and body["changed"] is False

    config_file.write_text("[health]\nrise = 0\n")
    status, body = await post(http, system.balancer_url + "/admin/reload")
    assert status == 400 and "[health] rise" in body["detail"]
    async with http.get(system.balancer_url + "/status") as response:
        assert (await response.json())["config_error"] == body["detail"]


async def test_delete_error_stats_resets_the_counters(make_config, start_system, http, admin_token) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/tasks/999999"):
        pass
    async with http.delete(system.balancer_url + "/errors/stats") as response:
        assert response.status == 401  # admin only
    async with http.delete(system.balancer_url + "/errors/stats", headers=AUTH) as response:
        assert response.status == 200
    async with http.get(system.balancer_url + "/errors/stats") as response:
        body = await response.json()
    assert body["total_errors"] == 0 and body["by_server"] == {}
    async with http.put(system.balancer_url + "/errors/stats") as response:
        assert response.status == 405 and {m.strip() for m in response.headers["Allow"].split(",")} == {"GET", "HEAD", "DELETE"}


async def test_a_forged_path_cannot_break_the_admin_log_line(make_config, start_system, http, admin_token, lb_log) -> None:
    system = await start_system(make_config())
    await post(http, system.balancer_url + "/admin/backends/x%0Aadmin%20action=stop/disable")
    (line,) = [m for m in lb_log.messages() if m.startswith("admin ")]
    assert "\n" not in line and line.endswith("result=404")
