"""TLS termination: HTTPS on the traffic and control listeners, certificates swapped by reload
for new connections only, refused handshakes counted as the balancer's, and the 308 redirect."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from support.waiting import wait_for
from yarl import URL

from lb_system import ConfigError, load_config
from lb_system.proxy.https_redirect import make_redirect_app

ADMIN = "admin-secret"


class Certificates:
    """A test CA and the server certificate files in a folder, rewritten in place for a reload."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.cert = folder / "cert.pem"
        self.key = folder / "key.pem"
        self.issue()

    def issue(self) -> trustme.LeafCert:
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        leaf.private_key_pem.write_to_path(str(self.key))
        return leaf

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # verifies the chain and the host name
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


class KeptConnection:
    """One TLS connection held open, HTTP/1.1 requests sent on it one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, context: ssl.SSLContext) -> KeptConnection:
        port = int(url.rsplit(":", 1)[1])
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=context))

    @property
    def certificate(self) -> bytes:
        return bytes(self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True))

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Length: 0"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
        return int(head[0].split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def certificate_of(url: str, context: ssl.SSLContext) -> bytes:
    """The certificate a new connection gets."""
    connection = await KeptConnection.open(url, context)
    try:
        status, _ = await connection.request("GET", "/health")
        assert status == 200
        return connection.certificate
    finally:
        await connection.close()


async def test_the_traffic_listener_speaks_https_to_a_verifying_client(
    make_config, start_system, outside_backend, certificates
) -> None:
    app = await outside_backend("app", misbehaves=False)
    config = make_config(backends=[{"name": "app", "url": app.url}], balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config)
    assert system.balancer_url.startswith("https://127.0.0.1:")
    connector = aiohttp.TCPConnector(ssl=certificates.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.get(system.balancer_url + "/anything?x=1") as response:
            assert response.status == 200
            seen = (await response.json())["headers"]
    assert seen["X-Forwarded-Proto"] == "https"


async def test_alpn_offers_http_1_1_and_tls_min_version_is_enforced(make_config, start_system, certificates) -> None:
    config = make_config(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem", "tls_min_version": "1.3"})
    system = await start_system(config)
    port = int(system.balancer_url.rsplit(":", 1)[1])
    context = certificates.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()
    old = certificates.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.open_connection("127.0.0.1", port, ssl=old)


async def test_tls_min_version_defaults_to_1_2(make_config, start_system, certificates) -> None:
    config = make_config(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    assert config.balancer.tls_min_version == "1.2"
    system = await start_system(config)
    port = int(system.balancer_url.rsplit(":", 1)[1])
    capped = certificates.client_context()
    capped.maximum_version = ssl.TLSVersion.TLSv1_2  # a TLS 1.2 client is served by default
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=capped)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()
    await writer.wait_closed()


async def test_a_reload_swaps_the_certificate_for_new_connections_and_keeps_open_ones(
    config_file, start_system, certificates, monkeypatch
) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", ADMIN)
    config_file.write(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    url, context = system.balancer_url, certificates.client_context()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    kept = await KeptConnection.open(url, context)  # one keep-alive connection, held open across the reload
    try:
        assert (await kept.request("GET", "/health"))[0] == 200
        first = kept.certificate
        certificates.issue()
        status, body = await kept.request("POST", "/admin/reload", admin)
        assert status == 200 and "[balancer] certificate replaced" in json.loads(body)["changes"]
        second = await certificate_of(url, context)
        assert second != first
        # The open connection still works, on the certificate it was opened with.
        assert (await kept.request("GET", "/health"))[0] == 200 and kept.certificate == first

        # A bad new key is refused: config_error names it, and new connections keep the last good certificate.
        certificates.key.write_text("not a key")
        assert (await kept.request("POST", "/admin/reload", admin))[0] == 400
        assert system.config_error is not None and "[balancer] tls_key: not a PEM private key" in system.config_error
        assert await certificate_of(url, context) == second
        status, body = await kept.request("GET", "/status")
        assert json.loads(body)["config_error"] == system.config_error
    finally:
        await kept.close()


async def test_plain_http_to_the_tls_port_is_the_balancers_refusal(make_config, start_system, http, certificates) -> None:
    system = await start_system(make_config(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"}))
    port = int(system.balancer_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /tasks HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await reader.read() == b""  # no TLS, no answer: the connection is closed
    writer.close()
    # A client hello that is not one.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01\x00\x05hello")
    assert await reader.read() == b""
    writer.close()
    await wait_for(lambda: system.tracker.total == 2, message="both refusals recorded")
    connector = aiohttp.TCPConnector(ssl=certificates.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.get(system.balancer_url + "/errors/stats") as response:
            stats = await response.json()
        async with client.get(system.balancer_url + "/metrics") as response:
            metrics = await response.text()
    assert stats["by_server"] == {"balancer": 2}
    details = sorted(error["detail"] for error in stats["recent_errors"])
    assert details[0] == "Plain HTTP sent to the HTTPS port" and details[1].startswith("TLS handshake failed: ")
    refused = re.search(r'lb_requests_total\{backend="balancer",code="400",method="OTHER"[^}]*\} (\S+)', metrics)
    assert refused is not None and float(refused.group(1)) == 2
    for backend in system.pool.backends:  # never blamed on a backend
        assert backend.requests == 0 and backend.consecutive_failures == 0


async def test_the_control_listener_can_speak_https_too(make_config, start_system, certificates) -> None:
    config = make_config(control={"port": 0, "tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config)
    assert system.control_url.startswith("https://") and system.balancer_url.startswith("http://")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certificates.client_context())) as client:
        async with client.get(system.control_url + "/health") as response:
            assert response.status == 200 and response.headers["X-Backend"] == "balancer"


async def test_a_reload_swaps_the_control_listeners_certificate_too(config_file, start_system, certificates, monkeypatch) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", ADMIN)
    config_file.write(control={"port": 0, "tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    url, context = system.control_url, certificates.client_context()
    kept = await KeptConnection.open(url, context)
    try:
        first = kept.certificate
        certificates.issue()
        status, body = await kept.request("POST", "/admin/reload", {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200 and "[control] certificate replaced" in json.loads(body)["changes"]
        assert await certificate_of(url, context) != first
        assert (await kept.request("GET", "/health"))[0] == 200 and kept.certificate == first
    finally:
        await kept.close()


async def test_the_redirect_port_answers_308_to_the_same_host_path_and_query_on_https(
    make_config, start_system, http, certificates
) -> None:
    config = make_config(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem", "redirect_http_port": 0})
    system = await start_system(config)
    https_port = int(system.balancer_url.rsplit(":", 1)[1])
    target = system.redirect_url + "/a/b%20c?x=1&y=%2F"
    for method in ("GET", "POST", "DELETE"):
        async with http.request(
            method, URL(target, encoded=True), headers={"Host": "Example.COM:80"}, allow_redirects=False
        ) as response:
            assert response.status == 308
            assert response.headers["Location"] == f"https://example.com:{https_port}/a/b%20c?x=1&y=%2F"
    async with http.get(system.redirect_url + "/", headers={"Host": "bad host"}, allow_redirects=False) as response:
        assert response.status == 400 and response.headers["Content-Type"] == "application/problem+json"


async def test_the_redirect_leaves_the_port_out_when_it_is_443(aiohttp_client) -> None:
    client = await aiohttp_client(make_redirect_app(443))
    async with client.get("/p?q=1", headers={"Host": "shop.example"}, allow_redirects=False) as response:
        assert response.status == 308 and response.headers["Location"] == "https://shop.example/p?q=1"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ('[balancer]\ntls_cert = "cert.pem"', "[balancer] tls_key: missing"),
        ('[balancer]\ntls_key = "key.pem"', "[balancer] tls_cert: missing"),
        ('[balancer]\ntls_cert = "nope.pem"\ntls_key = "key.pem"', "[balancer] tls_cert: no such file"),
        ('[balancer]\ntls_cert = "cert.pem"\ntls_key = "nope.pem"', "[balancer] tls_key: no such file"),
        ('[balancer]\ntls_cert = "key.pem"\ntls_key = "key.pem"', "[balancer] tls_cert: not a PEM certificate"),
        ('[balancer]\ntls_cert = "cert.pem"\ntls_key = "cert.pem"', "[balancer] tls_key: not a PEM private key"),
        ('[balancer]\ntls_cert = "cert.pem"\ntls_key = "other-key.pem"', "[balancer] tls_key: does not match the certificate"),
        ('[balancer]\ntls_cert = ""\ntls_key = "key.pem"', "[balancer] tls_cert:"),
        ('[balancer]\ntls_min_version = "1.1"', "[balancer] tls_min_version: Input should be '1.2' or '1.3'"),
        ("[balancer]\ntls_min_version = 1.2", "[balancer] tls_min_version:"),
        ("[balancer]\nredirect_http_port = 8081", "[balancer] redirect_http_port: needs tls_cert and tls_key"),
        (
            '[balancer]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\nredirect_http_port = 8080',
            "[balancer] redirect_http_port: port 8080 is already used by [balancer] port",
        ),
        ('[balancer]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\nredirect_http_port = 70000', "[balancer] redirect_http_port:"),
        ('[control]\ntls_cert = "cert.pem"\ntls_key = "key.pem"', "[control] tls_cert: needs [control] port"),
        ('[control]\nport = 9000\ntls_cert = "cert.pem"\ntls_key = "other-key.pem"', "[control] tls_key: does not match"),
        ('[control]\nport = 9000\ntls_min_version = "1.0"', "[control] tls_min_version:"),
    ],
)
def test_bad_tls_keys_are_one_line_naming_the_key(
    tmp_path: Path, certificates: Certificates, section: str, expected: str
) -> None:
    certificates.ca.issue_cert("other").private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    path = tmp_path / "config.toml"
    path.write_text(section)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


async def test_turning_tls_off_by_reload_is_refused_and_tls_keeps_serving(config_file, start_system, certificates) -> None:
    config_file.write(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    text = config_file.path.read_text()
    config_file.write_text(text.replace('tls_cert = "cert.pem"\n', "").replace('tls_key = "key.pem"\n', ""))
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    assert "[balancer] tls_cert: turning TLS on or off needs a restart" in system.config_error
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certificates.client_context())) as client:
        async with client.get(system.balancer_url + "/health") as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"balancer": {"tls_min_version": "1.3"}}, "[balancer] tls_min_version: changing it needs a restart"),
        ({"balancer": {"redirect_http_port": 0}}, "[balancer] redirect_http_port: changing it needs a restart"),
        ({"control": {"port": 0}}, "[control] port: changing it needs a restart"),
        ({"balancer": {"tls_key": "missing.pem"}}, "[balancer] tls_key: no such file"),
        ({"balancer": {"redirect_http_port": -1}}, "[balancer] redirect_http_port:"),
    ],
)
async def test_a_bad_or_restart_only_listener_edit_is_refused_and_the_old_config_keeps_serving(
    config_file, start_system, certificates, edit: dict, key: str
) -> None:
    config_file.write(balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    system = await start_system(config_file.load(), config_path=config_file.path, watch_interval=0.05)
    running = system.config
    config_file.write(**edit)
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    assert key in system.config_error and system.config is running
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certificates.client_context())) as client:
        async with client.get(system.balancer_url + "/status") as response:
            assert (await response.json())["config_error"] == system.config_error
