"""The README's walkthrough, "Put it in front of your app": examples/app.py behind the
balancer with examples/config.toml (its ports made free, its certificate from trustme)."""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
import trustme
from werkzeug.serving import make_server

from lb_system import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKEN = "walkthrough-token"


def example_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_app", EXAMPLES / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, str]]:
    """The two instances of the example Flask app on free ports, each served by Werkzeug in a
    thread of its own (a WSGI app: not on the test's loop): name -> URL."""
    pytest.importorskip("flask")  # the example's own need, never lb_system's
    module = example_app()
    servers = {name: make_server("127.0.0.1", 0, module.make_app(name), threaded=True) for name in ("web-1", "api-1")}
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers.values()]
    for thread in threads:
        thread.start()
    yield {name: f"http://127.0.0.1:{server.server_port}" for name, server in servers.items()}
    for server in servers.values():
        await asyncio.to_thread(server.shutdown)
        server.server_close()
    for thread in threads:
        thread.join()


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_the_walkthrough_config_serves_the_example_app_as_the_readme_shows(
    tmp_path: Path, apps: dict[str, str], start_system, http, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LB_READ_TOKEN", TOKEN)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    text = (EXAMPLES / "config.toml").read_text()
    for fixed in ("port = 8443", "redirect_http_port = 8080", "port = 8081"):
        assert fixed in text
        text = text.replace(fixed, fixed.split("=")[0] + "= 0")
    text = text.replace("http://127.0.0.1:9001", apps["web-1"]).replace("http://127.0.0.1:9002", apps["api-1"])
    (tmp_path / "config.toml").write_text(text)
    system = await start_system(load_config(tmp_path / "config.toml"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as client:
        async with client.get(system.balancer_url + "/") as response:
            assert await response.text() == "<h1>Hello from web-1</h1><p>you came in over https</p>"
        async with client.get(system.balancer_url + "/api/items") as response:
            body = await response.json()
            assert body["app"] == "api-1" and body["path"] == "/items"
        for path, expected in (("/health", {"app": "web-1", "ok": True}), ("/metrics", 'app_up{instance="web-1"} 1\n')):
            async with client.get(system.balancer_url + path) as response:
                assert (await response.json() if path == "/health" else await response.text()) == expected
    https_port = system.balancer_url.rsplit(":", 1)[1]
    async with http.get(system.redirect_url + "/api/items?page=2", allow_redirects=False) as response:
        assert response.status == 308
        assert response.headers["Location"] == f"https://127.0.0.1:{https_port}/api/items?page=2"
    async with http.get(system.control_url + "/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    async with http.get(system.control_url + "/status") as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"] == 'Basic realm="lb_system"'
    async with http.get(system.control_url + "/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
    assert not (tmp_path / "tasks.db").exists()
