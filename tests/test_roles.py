"""`--role`: one process serves everything (`all`), only the hosted task-API backends
(`backends`), or only the balancer in front of `url` backends (`balancer`)."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path

import pytest
from support.config_files import BASE_CONFIG, toml_text
from support.run_py import RUN, start_run_py, stop_run_py
from support.waiting import wait_for

from lb_system import ConfigError, System
from lb_system.cli.main import main


async def test_backends_role_serves_the_hosted_backends_and_no_balancer(make_config, start_system, http, lb_log) -> None:
    system = await start_system(make_config(), role="backends")
    assert system.balancer is None and system.balancer_url == ""
    assert set(system.hosted) == {"backend-1", "backend-2"}
    first, second = (system.hosted[name].url for name in ("backend-1", "backend-2"))
    async with http.post(first + "/tasks", json={"title": "one table"}) as response:
        assert response.status == 201
        task = await response.json()
    async with http.get(f"{second}/tasks/{task['id']}") as response:
        assert response.status == 200, "both hosted backends share the task store"
    (started,) = [line for line in lb_log.messages() if line.startswith("started ")]
    assert " role=backends " in started and "balancer=" not in started
    system.request_reload("SIGHUP")  # a backends-only process has no pool to edit: it says so, changes nothing
    assert lb_log.messages(logging.WARNING)[-1] == "config reload needs a restart with --role backends origin=SIGHUP"


async def test_balancer_role_serves_url_backends_and_opens_no_database(
    make_config, start_system, http, outside_backend, tmp_path
) -> None:
    outside = await outside_backend("remote-1")
    system = await start_system(make_config(backends=[{"name": "remote-1", "url": outside.url}]), role="balancer")
    assert system.hosted == {}
    async with http.get(system.balancer_url + "/anything") as response:
        assert response.status == 200 and response.headers["X-Backend"] == "remote-1"
    assert not (tmp_path / "tasks.db").exists(), "a balancer alone has no task store"


def test_balancer_role_refuses_a_hosted_backend_naming_it(make_config) -> None:
    config = make_config(backends=[{"name": "remote-1", "url": "http://127.0.0.1:9"}, {"name": "local-2", "port": 0}])
    expected = r"\[\[backends\]\] #2 \(local-2\) port: a hosted backend cannot run with --role balancer"
    with pytest.raises(ConfigError, match=expected):
        System(config, role="balancer")


def test_backends_role_with_nothing_to_host_is_a_config_error(make_config) -> None:
    with pytest.raises(ConfigError, match=r"\[\[backends\]\]: --role backends needs a hosted backend"):
        System(make_config(backends=[{"name": "remote-1", "url": "http://127.0.0.1:9"}]), role="backends")


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_a_reload_that_adds_a_hosted_backend_to_a_balancer_is_refused(
    config_file, start_system, outside_backend, http
) -> None:
    outside = await outside_backend("remote-1")
    config_file.write(backends=[{"name": "remote-1", "url": outside.url}])
    system = await start_system(config_file.load(), role="balancer", config_path=config_file.path)
    config_file.write(backends=[{"name": "remote-1", "url": outside.url}, {"name": "local-2", "port": 0}])
    await wait_for(lambda: system.config_error is not None, message="the edit refused")
    assert "(local-2) port: a hosted backend cannot run with --role balancer" in (system.config_error or "")
    assert [b.name for b in system.config.backends] == ["remote-1"]


def test_check_with_role_balancer_exits_2_with_one_line_naming_the_backend(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml_text(BASE_CONFIG))
    assert main(["check", "--config", str(path), "--role", "balancer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: [[backends]] #1 (backend-1) port:" in err and "--role balancer" in err
    assert main(["check", "--config", str(path), "--role", "backends"]) == 0
    assert "ok (role backends)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX")
async def test_a_backends_process_behind_a_balancer_process(tmp_path: Path, http) -> None:
    backends_dir, balancer_dir = tmp_path / "backends", tmp_path / "balancer"
    backends_dir.mkdir()
    balancer_dir.mkdir()
    (backends_dir / "config.toml").write_text(toml_text(BASE_CONFIG))
    backends, banner = await start_run_py("--role", "backends", cwd=backends_dir)
    processes = [backends]
    try:
        assert "role backends" in banner and "balancer on" not in banner
        urls = re.findall(r"(backend-\d) on (http://[\d.:]+)", banner)
        assert [name for name, _ in urls] == ["backend-1", "backend-2"]
        outside = {**BASE_CONFIG, "backends": [{"name": name, "url": url} for name, url in urls]}
        (balancer_dir / "config.toml").write_text(toml_text(outside))
        balancer, banner = await start_run_py("--role", "balancer", cwd=balancer_dir)
        processes.append(balancer)
        assert "role balancer" in banner
        found = re.search(r"balancer on (http://\S+?);", banner)
        assert found is not None
        async with http.post(found.group(1) + "/tasks", json={"title": "through two processes"}) as response:
            assert response.status == 201 and response.headers["X-Backend"] in ("backend-1", "backend-2")
        assert (backends_dir / "tasks.db").exists() and not (balancer_dir / "tasks.db").exists()
        # The log file is written by a thread in batches: its start-up line may follow the banner.
        for folder, role in ((balancer_dir, "balancer"), (backends_dir, "backends")):
            log = folder / "balancer.log"
            await wait_for(lambda: f" role={role} " in log.read_text(), message=f"role={role} in {log}")  # noqa: B023
    finally:
        codes = [await stop_run_py(process) for process in reversed(processes)]
    assert codes == [0] * len(processes)


@pytest.mark.slow
async def test_serving_a_hosted_backend_with_role_balancer_exits_2(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(toml_text(BASE_CONFIG))
    process = await asyncio.create_subprocess_exec(
        sys.executable, RUN, "--role", "balancer", cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    err = stderr.decode()
    assert process.returncode == 2
    assert err.count("\n") == 1 and "[[backends]] #1 (backend-1)" in err and "Traceback" not in err
