"""[control]: the balancer's own endpoints on a listener of their own, behind a read token."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

import aiohttp
import pytest
from support.waiting import wait_for

from lb_system import ConfigError, StartupError, load_config, parse_config
from lb_system.cli.demo import run_demo
from lb_system.cli.main import control_endpoint

TOKEN = "read-secret-123"
ADMIN = "admin-secret-456"


@pytest.fixture
def read_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LB_READ_TOKEN", TOKEN)
    monkeypatch.setenv("LB_ADMIN_TOKEN", ADMIN)
    return TOKEN


def basic(password: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_with_a_control_port_every_path_of_the_traffic_port_reaches_the_app(
    make_config, start_system, outside_backend, http, lb_log
) -> None:
    app = await outside_backend("app", misbehaves=False)
    system = await start_system(make_config(backends=[{"name": "app", "url": app.url}], control={"port": 0}))
    assert system.control_url and system.control_url != system.balancer_url
    for path in ["/", "/health", "/metrics", "/status", "/errors/stats", "/openapi.json", "/events", "/admin/reload"]:
        async with http.get(system.balancer_url + path) as response:
            assert response.status == 200, path
            assert response.headers["X-Backend"] == "app", path
            if path != "/health":  # the app's own /health answers for itself
                assert (await response.json())["path"] == path
    # The balancer's own endpoints answer on the control listener.
    async with http.get(system.control_url + "/health") as response:
        assert response.status == 200 and (await response.json())["serving_backends"] == 1
        assert response.headers["X-Backend"] == "balancer"
    async with http.get(system.control_url + "/metrics") as response:
        assert "lb_requests_total" in await response.text()
    async with http.get(system.control_url + "/") as response:
        assert response.status == 200 and "text/html" in response.headers["Content-Type"]
    async with http.get(system.control_url + "/tasks") as response:  # nothing is forwarded from here
        assert response.status == 404 and response.headers["Content-Type"] == "application/problem+json"
    assert system.dashboard_url == system.control_url + "/"
    started = next(r for r in lb_log.messages() if r.startswith("started "))
    assert f"balancer={system.balancer_url}" in started and f"control={system.control_url}" in started


async def test_the_control_listener_binds_its_own_host(make_config, start_system, http) -> None:
    # 127.0.0.2 is loopback on Linux too: a listener bound there is not reachable on 127.0.0.1.
    system = await start_system(make_config(control={"host": "127.0.0.2", "port": 0}))
    assert system.control_url.startswith("http://127.0.0.2:") and system.balancer_url.startswith("http://127.0.0.1:")
    async with http.get(system.control_url + "/health") as response:
        assert response.status == 200 and response.headers["X-Backend"] == "balancer"
    port = int(system.control_url.rsplit(":", 1)[1])
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"http://127.0.0.1:{port}/health"):
            pass


async def test_the_read_token_guards_every_control_endpoint_but_health(
    make_config, start_system, outside_backend, http, read_token
) -> None:
    app = await outside_backend("app", misbehaves=False)
    config = make_config(backends=[{"name": "app", "url": app.url}], control={"port": 0, "read_token_env": "LB_READ_TOKEN"})
    system = await start_system(config)
    control = system.control_url
    for path in ["/", "/status", "/metrics", "/errors/stats", "/openapi.json", "/events", "/nowhere"]:
        async with http.get(control + path) as response:
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"] == 'Basic realm="lb_system"'
            assert response.headers["Content-Type"] == "application/problem+json"
            assert (await response.json())["status"] == 401
        for wrong in [f"Bearer {TOKEN}x", basic("nope"), "Basic !!!", f"Token {TOKEN}"]:
            async with http.get(control + path, headers={"Authorization": wrong}) as response:
                assert response.status == 401, (path, wrong)
    async with http.get(control + "/health") as response:  # open for uptime probes
        assert response.status == 200
    for good in [f"Bearer {TOKEN}", basic(TOKEN), basic(TOKEN, user=""), f"Bearer {ADMIN}"]:
        async with http.get(control + "/status", headers={"Authorization": good}) as response:
            assert response.status == 200, good
    async with http.get(control + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        text = await response.text()
    # The 401s are the balancer's own answers: counted as its requests and its errors.
    assert 'lb_requests_total{backend="balancer",code="401",method="GET"}' in text
    assert 'lb_errors_total{backend="balancer",code="401",type="401_UNAUTHORIZED"}' in text
    # The admin API keeps its own token.
    async with http.post(control + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 401
    # The traffic port forwards everything, without a token.
    async with http.get(system.balancer_url + "/status") as response:
        assert response.status == 200 and response.headers["X-Backend"] == "app"


def test_a_read_token_without_a_control_port_is_a_config_error(make_config) -> None:
    with pytest.raises(ConfigError, match=r"\[control\] read_token_env: needs \[control\] port"):
        make_config(control={"read_token_env": "LB_READ_TOKEN"})


async def test_a_read_token_variable_that_is_not_set_stops_start_up(make_config, start_system, monkeypatch) -> None:
    monkeypatch.delenv("LB_UNSET_TOKEN", raising=False)
    with pytest.raises(StartupError, match=r"\[control\] read_token_env: the environment variable LB_UNSET_TOKEN is not set"):
        await start_system(make_config(control={"port": 0, "read_token_env": "LB_UNSET_TOKEN"}))


async def test_own_error_answers_count_in_lb_requests_total_on_the_traffic_port(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    url = system.balancer_url
    async with http.post(url + "/admin/reload") as response:  # the admin API is off: 403
        assert response.status == 403
    async with http.delete(url + "/status") as response:
        assert response.status == 405
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    assert 'lb_requests_total{backend="balancer",code="403",method="POST"} 1.0' in text
    assert 'lb_requests_total{backend="balancer",code="405",method="DELETE"} 1.0' in text


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[control]\nport = 8080", "[control] port: port 8080 is already used by [balancer] port"),
        ("[control]\nport = -1", "[control] port:"),
        ('[control]\nport = "9000"', "[control] port: Input should be a valid integer"),
        ("[control]\nhost = 1", "[control] host:"),
        ('[control]\nread_token_env = "LB_X"', "[control] read_token_env: needs [control] port"),
        ('[control]\nport = 9000\nread_token_env = "1 bad"', "[control] read_token_env: String should match"),
        ('[control]\nport = 9000\nread_token_env = ""', "[control] read_token_env:"),
        ("[control]\nport = 9000\ncolour = 1", "[control] colour: unknown key"),
        ("[control]\nport = 5001", "port: port 5001 is already used by [control] port"),
    ],
)
def test_bad_control_keys_are_one_line_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value) and "\n" not in str(caught.value)


async def test_a_bad_read_token_edit_is_refused_and_the_old_config_keeps_serving(
    config_file, start_system, http, read_token, monkeypatch
) -> None:
    config_file.write(control={"port": 0, "read_token_env": "LB_READ_TOKEN"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    monkeypatch.delenv("LB_OTHER_TOKEN", raising=False)
    config_file.write(control={"read_token_env": "LB_OTHER_TOKEN"})
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    assert "[control] read_token_env: the environment variable LB_OTHER_TOKEN is not set" in system.config_error
    async with http.get(system.control_url + "/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200 and (await response.json())["config_error"] == system.config_error
    config_file.write(control={"read_token_env": "LB_ADMIN_TOKEN"})  # a live key: applied
    await wait_for(lambda: system.config_error is None, message="the good edit applied")
    async with http.get(system.control_url + "/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 401


def test_the_config_summary_names_every_listener() -> None:
    summary = parse_config({"control": {"port": 8081}}).summary()
    assert summary.startswith("balancer on 127.0.0.1:8080, control on 127.0.0.1:8081 (round_robin)")


async def test_a_control_port_in_use_stops_start_up_naming_it(make_config, start_system) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"port {port}"):
            await start_system(make_config(control={"port": port}))


async def test_the_demo_reads_the_error_statistics_from_the_control_listener(make_config, start_system, read_token) -> None:
    config = make_config(control={"port": 0, "read_token_env": "LB_READ_TOKEN"}, api={"debug_endpoints": True})
    system = await start_system(config)
    stats_url, headers = control_endpoint(system.config)
    assert stats_url is not None and stats_url.endswith(":0")  # the configured port: here a free one
    assert headers == {"Authorization": f"Bearer {TOKEN}"}
    out = io.StringIO()
    code = await run_demo(system.balancer_url, out, stats_url=system.control_url, stats_headers=headers)
    assert code == 0
    assert '"total_errors": 3' in out.getvalue()
