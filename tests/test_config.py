"""config.toml: defaults, resolution of paths, and one clear line for every kind of mistake."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lb_system import ConfigError, StartupError, System, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_config_is_the_documented_default() -> None:
    shipped = load_config(REPO / "config.toml")
    default = parse_config({}, base_dir=REPO)
    assert shipped == default
    assert (shipped.balancer.host, shipped.balancer.port, shipped.balancer.strategy) == ("127.0.0.1", 8080, "round_robin")
    assert (shipped.health.path, shipped.health.interval, shipped.health.timeout) == ("/health", 2.0, 1.0)
    assert (shipped.health.rise, shipped.health.fall) == (2, 3)
    assert shipped.errors.recent == 50
    assert shipped.api.debug_endpoints is True and shipped.api.max_body_bytes == 1048576
    assert [(b.name, b.port, b.hosted) for b in shipped.backends] == [("backend-1", 5001, True), ("backend-2", 5002, True)]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "lb.toml").write_text('[database]\npath = "data/tasks.db"\n[log]\nfile = "balancer.log"\n')
    config = load_config(folder / "lb.toml")
    assert Path(config.database.path) == folder / "data" / "tasks.db"
    assert Path(config.log.file) == folder / "balancer.log"


def test_an_outside_backend_is_a_url(tmp_path: Path) -> None:
    config = parse_config({"backends": [{"name": "remote-1", "url": "http://10.0.0.12:5001", "weight": 3}]})
    (backend,) = config.backends
    assert backend.hosted is False and backend.url == "http://10.0.0.12:5001" and backend.weight == 3


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[balancer\nport = 1", "TOML syntax error"),
        ("[nonsense]\nx = 1", "[nonsense]: unknown section"),
        ("[health]\nintervall = 2.0", "[health] intervall: unknown key"),
        ('[balancer]\nport = "8080"', "[balancer] port: Input should be a valid integer"),
        ("[balancer]\nport = 70000", "[balancer] port:"),
        ("[health]\ninterval = -1.0", "[health] interval:"),
        ("[health]\ninterval = 0.001", "[health] interval: Input should be greater than or equal to 0.1"),
        ("[health]\ntimeout = 61", "[health] timeout: Input should be less than or equal to 60"),
        ("[health]\nrise = 0", "[health] rise:"),
        ("[api]\ndebug_endpoints = 1", "[api] debug_endpoints:"),
        ('[balancer]\nstrategy = "fastest"', "[balancer] strategy: must be one of"),
        ('[log]\nlevel = "LOUD"', "[log] level:"),
        ('[log]\naccess_file = ""', "[log] access_file:"),
        ('[log]\naccess_file = "balancer.log"', "[log] access_file: must not be [log] file"),
        ('[log]\naccess_file = "access-{host}.log"', "[log] access_file: the only placeholder"),
        ("[log]\naccess_max_bytes = -1", "[log] access_max_bytes:"),
        ('[log]\naccess_max_bytes = "10M"', "[log] access_max_bytes:"),
        ("[log]\naccess_backups = 101", "[log] access_backups:"),
        ("[log]\naccess_backups = -1", "[log] access_backups:"),
        ('[[backends]]\nname = "a"\nport = 5001\n[[backends]]\nname = "a"\nport = 5002', "[[backends]] #2 (a) name: duplicate"),
        ('[[backends]]\nname = "a"\nport = 5001\n[[backends]]\nname = "b"\nport = 5001', "[[backends]] #2 (b) port: port 5001"),
        ('[[backends]]\nname = "a"\nport = 8080', "[[backends]] #1 (a) port: port 8080 is already used by [balancer] port"),
        ('[[backends]]\nname = "a"', "[[backends]] #1 (a): needs exactly one of 'port'"),
        ('[[backends]]\nname = "a"\nport = 5001\nurl = "http://x:1"', "[[backends]] #1 (a): needs exactly one of 'port'"),
        ('[[backends]]\nname = "a"\nurl = "ftp://x"', "[[backends]] #1 (a): url must look like"),
        ("[[backends]]\nport = 5001", "[[backends]] #1 name: Field required"),
        ('[[backends]]\nname = "a"\nport = 5001\ncolour = "red"', "[[backends]] #1 (a) colour: unknown key"),
        ("[proxy]\nupstream_idle_timeout = 0", "[proxy] upstream_idle_timeout:"),
        ("[proxy]\nmax_tunnels_per_backend = 0", "[proxy] max_tunnels_per_backend:"),
        ('[proxy]\nca_file = "missing-ca.pem"', "[proxy] ca_file: no such file"),
        ("[proxy]\nmax_response_header_bytes = 100", "[proxy] max_response_header_bytes:"),
        ('[proxy]\nmax_response_header_bytes = "64k"', "[proxy] max_response_header_bytes:"),
        ("[proxy]\nmax_response_headers = 0", "[proxy] max_response_headers:"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_the_upstream_keys_default_and_ca_file_resolves_against_the_config_folder(tmp_path: Path) -> None:
    proxy = parse_config({}).proxy
    assert (proxy.upstream_idle_timeout, proxy.max_tunnels_per_backend, proxy.ca_file) == (30.0, 1000, None)
    assert (proxy.max_response_header_bytes, proxy.max_response_headers) == (65536, 100)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("not parsed here")
    (tmp_path / "lb.toml").write_text('[proxy]\nca_file = "certs/ca.pem"\nupstream_idle_timeout = 5.0\n')
    proxy = load_config(tmp_path / "lb.toml").proxy
    assert Path(proxy.ca_file or "") == tmp_path / "certs" / "ca.pem"
    assert proxy.upstream_idle_timeout == 5.0


def test_health_interval_and_timeout_limits_are_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[health]\ninterval = 0.1\ntimeout = 60\n")
    health = load_config(path).health
    assert (health.interval, health.timeout) == (0.1, 60)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


async def test_a_port_in_use_stops_start_up_naming_the_port(make_config) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        system = System(make_config(backends=[{"name": "backend-1", "port": port}]))
        with pytest.raises(StartupError, match=f"port {port} .*already in use"):
            await system.start()
    assert system.hosted == {} and system.balancer_runner is None


@pytest.mark.parametrize(
    ("host", "url"),
    [("0.0.0.0", "http://127.0.0.1:8080"), ("::", "http://[::1]:8080"), ("127.0.0.1", "http://127.0.0.1:8080")],
)
def test_a_wildcard_bind_address_is_dialled_on_loopback(host: str, url: str) -> None:
    from lb_system.operations.serving import dial_url

    assert dial_url(host, 8080) == url
