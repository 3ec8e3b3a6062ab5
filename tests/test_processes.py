"""`python run.py --role balancer --processes N`: one parent, N balancer processes on one port.
A child killed is restarted, SIGHUP reloads every child, SIGTERM stops them all, and a child
whose parent died without a word stops by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from support.backends import FakeBackend
from support.waiting import wait_for

from lb_system.cli import main
from lb_system.config import reuse_port_available
from lb_system.operations.supervisor import BackOff

REPO = Path(__file__).resolve().parent.parent
RUN = str(REPO / "run.py")

pytestmark = [
    pytest.mark.skipif(not reuse_port_available(), reason="several processes on one port need SO_REUSEPORT"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, backend: FakeBackend, port: int) -> Path:
    path = folder / "lb.toml"
    path.write_text(
        f"[balancer]\nport = {port}\nreuse_port = true\ninstance_port = 0\nshutdown_grace = 2.0\n"
        "[health]\ninterval = 0.2\n"
        '[log]\nfile = "balancer-{pid}.log"\n'
        f'[[backends]]\nname = "outside"\nurl = "{backend.url}"\n'
    )
    return path


def log_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


class Group:
    """A running `--processes` parent, read through its log file and its children's."""

    def __init__(self, process: asyncio.subprocess.Process, folder: Path, port: int) -> None:
        self.process, self.folder, self.port = process, folder, port
        self.log = folder / f"balancer-{process.pid}.log"

    def children(self) -> dict[int, int]:
        """Index -> pid of the latest child started in each slot."""
        found: dict[int, int] = {}
        for line in log_lines(self.log):
            started = re.search(r" child started index=(\d+) pid=(\d+)", line)
            if started:
                found[int(started.group(1))] = int(started.group(2))
        return found

    def child_log(self, pid: int) -> list[str]:
        return log_lines(self.folder / f"balancer-{pid}.log")

    def instance_url(self, pid: int) -> str | None:
        for line in self.child_log(pid):
            found = re.search(r" started .*\binstance=(http://\S+)", line)
            if found:
                return found.group(1)
        return None

    async def serving(self, count: int) -> dict[int, str]:
        """Wait until `count` children have started serving; pid -> instance URL."""

        def ready() -> bool:
            pids = self.children().values()
            return len(pids) == count and all(self.instance_url(pid) for pid in pids)

        await wait_for(ready, timeout=30, message=f"{count} children serving")
        return {pid: self.instance_url(pid) or "" for pid in self.children().values()}


async def status_pid(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/status") as response:
        assert response.status == 200
        pid: int = (await response.json())["instance"]["pid"]
        return pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
async def group(
    tmp_path: Path, outside_backend: Callable[..., Awaitable[FakeBackend]]
) -> AsyncIterator[Callable[[], Awaitable[Group]]]:
    groups: list[Group] = []

    async def start() -> Group:
        port = free_port()
        config = write_config(tmp_path, await outside_backend(), port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, RUN, "--config", str(config), "--role", "balancer", "--processes", "2", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        groups.append(Group(process, tmp_path, port))
        return groups[-1]

    yield start
    for running in groups:
        pids = list(running.children().values())
        if running.process.returncode is None:
            running.process.kill()
            await running.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_a_child_that_dies_is_restarted(group, http) -> None:
    running = await group()
    before = await running.serving(2)
    victim = running.children()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: running.children()[0] != victim, timeout=15, message="a new child in slot 0")
    after = await running.serving(2)
    replacement = running.children()[0]
    assert await status_pid(http, after[replacement]) == replacement
    exited = [line for line in log_lines(running.log) if " child exited " in line]
    assert len(exited) == 1 and f"pid={victim} status=SIGKILL" in exited[0] and "restart_in_s=" in exited[0]
    assert set(after) - set(before) == {replacement}
    # The shared port answers from the children alone.
    assert await status_pid(http, f"http://127.0.0.1:{running.port}") in after


@pytest.mark.slow
async def test_sighup_to_the_parent_reloads_every_child(group) -> None:
    running = await group()
    children = await running.serving(2)
    running.process.send_signal(signal.SIGHUP)

    def all_reloaded() -> bool:
        return all(any("config reloaded origin=SIGHUP" in line for line in running.child_log(pid)) for pid in children)

    await wait_for(all_reloaded, timeout=15, message="every child logging its reload")
    assert running.process.returncode is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_or_sigint_to_the_parent_stops_every_child(group, sig: int) -> None:
    running = await group()
    children = await running.serving(2)
    running.process.send_signal(sig)
    assert await asyncio.wait_for(running.process.wait(), 20) == 0
    assert all(gone(pid) for pid in children)
    for pid in children:
        assert "stopped" in running.child_log(pid)[-1]
    assert " stopped processes=2" in log_lines(running.log)[-1]


@pytest.mark.slow
async def test_children_stop_when_their_parent_is_killed(group) -> None:
    running = await group()
    children = await running.serving(2)
    running.process.kill()  # it can forward nothing
    await running.process.wait()
    await wait_for(lambda: all(gone(pid) for pid in children), timeout=15, message="the orphans to stop")


@pytest.mark.slow
async def test_a_child_that_cannot_start_stops_the_group_with_its_status(tmp_path: Path, outside_backend) -> None:
    with socket.socket() as busy:  # without SO_REUSEPORT: no process can share it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, await outside_backend(), port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, RUN, "--config", str(config), "--role", "balancer", "--processes", "2", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in stderr.decode()
    assert "child could not start" in stderr.decode()


PID_LOG = '[log]\nfile = "b-{pid}.log"\n'
REFUSED = {
    "no reuse_port": (
        "[balancer]\nport = 8080\n" + PID_LOG,
        "2",
        r"\[balancer\] reuse_port: --processes 2 needs reuse_port = true",
    ),
    "port 0": (
        "[balancer]\nport = 0\nreuse_port = true\n" + PID_LOG,
        "2",
        r"\[balancer\] port: --processes 2 needs a fixed port",
    ),
    "one log file": ("[balancer]\nreuse_port = true\n", "2", r"\[log\] file: --processes 2 needs \{pid\} in the name"),
    "one access file": (
        "[balancer]\nreuse_port = true\n" + PID_LOG + 'access_file = "access.log"\n',
        "3",
        r"\[log\] access_file: --processes 3 needs \{pid\}",
    ),
}


@pytest.mark.parametrize(("config", "processes", "expected"), REFUSED.values(), ids=REFUSED.keys())
def test_check_refuses_processes_the_config_cannot_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config: str,
    processes: str,
    expected: str,
) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(config + '[[backends]]\nname = "outside"\nurl = "http://127.0.0.1:9"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--config", "lb.toml", "--role", "balancer", "--processes", processes]) == 2
    err = capsys.readouterr().err
    assert re.match(r"^error: lb.toml: " + expected, err) and err.count("\n") == 1, err


def test_processes_run_balancers_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lb.toml"
    path.write_text('[balancer]\nreuse_port = true\n[log]\nfile = "b-{pid}.log"\n')
    assert main(["check", "--config", str(path), "--processes", "2"]) == 2
    assert "--processes runs balancer processes: add --role balancer" in capsys.readouterr().err


def test_check_accepts_a_config_several_processes_can_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(
        '[balancer]\nreuse_port = true\ninstance_port = 9101\n[log]\nfile = "b-{pid}.log"\n'
        '[[backends]]\nname = "outside"\nurl = "http://127.0.0.1:9"\n'
    )
    assert main(["check", "--config", str(path), "--role", "balancer", "--processes", "2"]) == 0
    assert "ok (role balancer), 2 processes:" in capsys.readouterr().out


def test_the_restart_back_off_doubles_up_to_its_cap() -> None:
    back_off = BackOff(first=0.5, longest=30.0)
    assert [back_off.delay(deaths) for deaths in (1, 2, 3, 4, 7, 8, 50)] == [0.5, 1.0, 2.0, 4.0, 30.0, 30.0, 30.0]
