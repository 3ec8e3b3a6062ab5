"""`python run.py` as a user runs it: a real process, real signals, real output."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = str(REPO / "run.py")
POSIX = sys.platform != "win32"
UVLOOP = POSIX and importlib.util.find_spec("uvloop") is not None


# Every test here runs `python run.py` in a subprocess.
pytestmark = pytest.mark.slow


def write_config(folder: Path, balancer_port: int = 0, **extra: str) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f"[balancer]\nport = {balancer_port}\n"
        "[health]\ninterval = 0.2\n"
        '[[backends]]\nname = "backend-1"\nport = 0\n'
        '[[backends]]\nname = "backend-2"\nport = 0\n' + "".join(extra.values())
    )
    return path


async def run(*args: str, cwd: Path, timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, RUN, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


class Served:
    """A `python run.py` process, started and read until its balancer URL is known."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, banner: str) -> None:
        self.process, self.url, self.banner = process, url, banner

    @classmethod
    async def start(cls, config: Path, env: dict[str, str] | None = None) -> Served:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            RUN,
            "--config",
            str(config),
            cwd=config.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert process.stderr is not None
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
            if not line:
                raise AssertionError(f"run.py exited with {await process.wait()} before serving")
            found = re.search(r"balancer on (http://\S+?);", line)
            if found:
                return cls(process, found.group(1), line)

    async def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 20)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


@pytest.fixture
async def served(tmp_path: Path):
    started: list[Served] = []

    async def start(config: Path, env: dict[str, str] | None = None) -> Served:
        server = await Served.start(config, env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


async def test_check_prints_a_summary_and_exits_0(tmp_path: Path) -> None:
    code, out, _ = await run("check", "--config", str(write_config(tmp_path)), cwd=tmp_path)
    assert code == 0
    assert "ok" in out and "2 backends" in out and len(out.strip().splitlines()) == 1


async def test_check_of_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[health]\ninterval = 0.001\n")  # would burn a core
    code, out, err = await run("check", "--config", str(path), cwd=tmp_path)
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 and "[health] interval" in err and str(path) in err


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[[backends]]\nname = "a"\nport = 5001\n[[routes]]\npath_prefix = "/api"\npool = "api"\n', "[[routes]] #1 pool"),
        ("[pools.api.health]\ninterval = 0.001\n", "[pools.api.health] interval"),
        ('[log]\naccess_file = "balancer.log"\n', "[log] access_file"),
        ("[log]\naccess_max_bytes = -1\n", "[log] access_max_bytes"),
        ("[log]\naccess_backups = 101\n", "[log] access_backups"),
    ],
)
async def test_check_of_a_bad_route_pool_or_access_log_key_exits_2_with_one_line(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    code, _, err = await run("check", "--config", str(path), cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and key in err and str(path) in err


async def test_serving_with_a_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[backends]]\nname = "x"\n')
    code, _, err = await run("--config", str(path), cwd=tmp_path)
    assert code == 2 and "[[backends]] #1 (x)" in err and "Traceback" not in err


async def test_a_busy_port_stops_start_up_naming_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run("--config", str(write_config(tmp_path, balancer_port=port)), cwd=tmp_path)
    assert code == 1
    assert f"port {port}" in err and "already in use" in err and "Traceback" not in err


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_stops_cleanly_on_a_signal(tmp_path: Path, served, sig: int) -> None:
    server = await served(write_config(tmp_path))
    code, stderr = await server.stop(sig)
    assert code == 0
    assert "Traceback" not in stderr
    assert (tmp_path / "tasks.db").exists()
    assert not (tmp_path / "tasks.db-wal").exists(), "the database was not closed"
    log = (tmp_path / "balancer.log").read_text()
    assert "started balancer=" in log and "stopping" in log


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
@pytest.mark.parametrize("token", ["", "s3cret-admin-token"])
async def test_start_up_says_where_the_dashboard_is_and_if_admin_is_on_and_the_log_ends_with_stopped(
    tmp_path: Path, served, token: str
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "LB_ADMIN_TOKEN"}
    if token:
        env["LB_ADMIN_TOKEN"] = token
    server = await served(write_config(tmp_path), env)
    code, stderr = await server.stop()
    assert code == 0
    state = "on" if token else "off"
    banner = server.banner.strip()
    assert f"; dashboard at {server.url}/;" in banner and f"; admin API {state} " in banner
    assert re.fullmatch(r"lb_system: ([^;]+; )+Ctrl-C stops", banner)  # no empty segment
    lines = (tmp_path / "balancer.log").read_text().splitlines()
    (started,) = [line.split(" ", 2)[2] for line in lines if " INFO started " in line]
    where = f"balancer={server.url} dashboard={server.url}/"
    assert started.startswith(f"started {where} admin={state} admin_token_env=LB_ADMIN_TOKEN backends=backend-1@http")
    assert re.fullmatch(r"started( \w+=[^\s']+)+", started)  # every field has a value
    assert started.endswith(" loop=uvloop" if UVLOOP else " loop=asyncio")  # run.py uses uvloop where installed
    assert lines[-1].split(" ", 2)[1:] == ["INFO", f"stopped balancer={server.url}"]  # after the database closed
    assert not (tmp_path / "tasks.db-wal").exists()
    assert not token or token not in banner + stderr + "\n".join(lines)


async def test_demo_prints_the_three_errors_and_the_stats(tmp_path: Path, served) -> None:
    server = await served(write_config(tmp_path))
    code, out, err = await run("demo", "--url", server.url, cwd=tmp_path)
    assert code == 0, err
    assert "[ERROR 400] Sending an empty JSON body...\nStatus: 400 | Response: Empty or malformed JSON body\n" in out
    assert "[ERROR 404] Requesting a task that does not exist...\nStatus: 404 | Response: Task 999999 not found\n" in out
    assert "[ERROR 500] Forcing an internal error (division by zero)...\nStatus: 500 | Response: Internal server error\n" in out
    stats = json.loads(out.split("[STATS] Error statistics...\n", 1)[1])
    assert stats["total_errors"] == 3
    assert stats["error_types"] == {"400_BAD_REQUEST": 1, "404_NOT_FOUND": 1, "500_INTERNAL_ERROR": 1}
    log = (tmp_path / "balancer.log").read_text()
    assert "ZeroDivisionError" in log, "the 500's traceback belongs in the log"
    assert re.search(r"access method=GET path=/tasks/999999 status=404 backend=backend-\d duration_ms=[\d.]+ request_id=\w+", log)


async def test_demo_uses_the_configs_balancer_by_default(tmp_path: Path, served) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, balancer_port=port)
    await served(config)
    code, out, _ = await run("demo", "--config", str(config), cwd=tmp_path)
    assert code == 0 and '"total_errors": 3' in out


async def test_demo_exits_1_when_the_statuses_are_not_the_expected_ones(tmp_path: Path, served) -> None:
    server = await served(write_config(tmp_path, api="[api]\ndebug_endpoints = false\n"))
    code, out, _ = await run("demo", "--url", server.url, cwd=tmp_path)
    assert code == 1
    assert "Status: 404" in out


async def test_demo_against_nothing_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = await run("demo", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 and f"nothing answers at http://127.0.0.1:{port}" in err


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
async def test_the_log_appends_across_restarts(tmp_path: Path, served) -> None:
    config = write_config(tmp_path)
    for _ in range(2):
        server = await served(config)
        code, _ = await server.stop()
        assert code == 0
    log = (tmp_path / "balancer.log").read_text()
    assert log.count("started balancer=") == 2
    assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR) ", line) for line in log.splitlines())
