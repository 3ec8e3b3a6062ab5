"""`[log] access_file`: the access lines in a file of their own, written in batches by one thread,
rotated by their own keys; balancer.log keeps everything else."""

from __future__ import annotations

import json
import logging
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from support.logs import LogRecords, LogSetup
from support.waiting import wait_for
from test_log_files import all_healthy, all_lines, log_files, parse

from lb_system.config import Config, LogConfig
from lb_system.observability.access_log import AccessLog
from lb_system.observability.log import LOGGER_NAME, with_fields

LINE: dict[str, Any] = {
    "method": "GET",
    "path": "/tasks/1",
    "status": 200,
    "backend": "backend-1",
    "duration_ms": 1.5,
    "request_id": "r",
    "tries": "backend-1:200",
}


def start(log_to: LogSetup, make_config, **log: object) -> tuple[AccessLog, LogConfig]:
    """Logging as `python run.py` sets it up, access lines to `access.log`; the hot path's writer."""
    config = make_config(log={"access_file": "access.log", **log})
    return AccessLog(log_to.start(config)), config.log


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def lines_are(path: Path, count: int) -> bool:
    return len(read(path)) == count


def test_batched_lines_are_complete_and_in_order_after_a_clean_stop(make_config, log_to) -> None:
    access, config = start(log_to, make_config)
    writers = 4

    def write(worker: int) -> None:
        for number in range(2000):
            access.write(**{**LINE, "request_id": f"w{worker}-{number}", "path": f"/p/{'x' * (number % 50)}"})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log_to.flush()  # no wait for the writer's next wake-up: stopping writes what is left

    records = parse(Path(config.access_file or ""), "text")  # every line one whole record, or parse fails
    seen: dict[int, list[int]] = {w: [] for w in range(writers)}
    for record in records:
        worker, number = str(record["request_id"])[1:].split("-")
        assert record["path"] == "/p/" + "x" * (int(number) % 50) and record["event"] == "access"
        seen[int(worker)].append(int(number))
    assert all(numbers == list(range(2000)) for numbers in seen.values())  # none lost, each in order
    assert read(Path(config.file)) == []


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_a_trickle_of_lines_is_written_within_a_second(make_config, log_to) -> None:
    access, config = start(log_to, make_config)
    path = Path(config.access_file or "")
    for number in range(5):
        access.write(**{**LINE, "request_id": f"t{number}"})
        await wait_for(partial(lines_are, path, number + 1), timeout=1.0, message=f"line {number} written")
    assert [line.split("request_id=")[1].split()[0] for line in read(path)] == [f"t{n}" for n in range(5)]


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_line_in_the_access_file_is_the_line_balancer_log_would_have(make_config, log_to, form: str) -> None:
    shared = make_config(log={"file": "shared.log", "format": form}).log
    AccessLog(log_to.start(make_config(log={"file": "shared.log", "format": form}))).write(
        **LINE, client="10.0.0.1", reason="shed"
    )
    log_to.flush()
    access, config = start(log_to, make_config, format=form)
    access.write(**LINE, client="10.0.0.1", reason="shed")
    log_to.flush()

    (in_shared,) = read(Path(shared.file))
    (in_own,) = read(Path(config.access_file or ""))
    if form == "json":
        assert {**json.loads(in_own), "time": 0} == {**json.loads(in_shared), "time": 0}
    else:
        assert in_own.split(" ", 1)[1] == in_shared.split(" ", 1)[1]  # all but the time
        assert in_own.split(" ", 1)[1].startswith("INFO access method=GET path=/tasks/1 status=200")


def test_the_access_file_rotates_by_its_own_keys(make_config, log_to) -> None:
    access, config = start(log_to, make_config, access_max_bytes=2000, access_backups=3, max_bytes=100)
    logging.getLogger(LOGGER_NAME).warning("kept in balancer.log")
    for number in range(120):
        access.write(**{**LINE, "request_id": f"n{number:04d}", "tries": "x" * 40})
    log_to.flush()

    path = Path(config.access_file or "")
    files = log_files(path)
    assert len(files) == 4 and all(f.stat().st_size < 2000 for f in files)
    numbers = [int(line.split("request_id=n")[1][:4]) for line in all_lines(path)]
    assert numbers == list(range(numbers[0], 120))  # the newest lines, in order, none missing
    assert [line.split(" ", 1)[1] for line in read(Path(config.file))] == ["WARNING kept in balancer.log"]
    assert log_files(Path(config.file)) == [Path(config.file)]  # balancer.log's own max_bytes never tripped


async def test_a_running_system_writes_access_lines_to_their_file_and_the_rest_to_balancer_log(
    make_config, start_system, http, log_to
) -> None:
    config: Config = make_config(log={"access_file": "logs/access.log"})
    log_to.start(config)
    system = await start_system(config)
    await wait_for(partial(all_healthy, system.pool.backends), message="backends up")
    for number in range(3):
        async with http.get(system.balancer_url + "/tasks/999", headers={"X-Request-ID": f"own-{number}"}) as response:
            assert response.status == 404
    await system.stop()
    log_to.flush()

    access = parse(Path(config.log.access_file or ""), "text")
    assert [r["request_id"] for r in access] == ["own-0", "own-1", "own-2"]
    assert {r["event"] for r in access} == {"access"}
    rest = parse(Path(config.log.file), "text")
    assert "access" not in {r["event"] for r in rest}
    assert {"started", "stopped"} <= {r["event"] for r in rest}


def test_an_access_line_still_reaches_the_access_file_with_another_handler_on_the_logger(make_config, log_to) -> None:
    access, config = start(log_to, make_config)
    logger = logging.getLogger(LOGGER_NAME)
    watcher = LogRecords()  # a second handler: the line goes as a record through both
    logger.addHandler(watcher)
    try:
        access.write(**LINE)
    finally:
        logger.removeHandler(watcher)
    log_to.flush()
    assert watcher.messages() == [with_fields("access", {**LINE})]
    assert read(Path(config.access_file or ""))[0].endswith("INFO " + with_fields("access", LINE))
    assert read(Path(config.file)) == []
