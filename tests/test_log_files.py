"""balancer.log: size-based rotation that loses and splits no line, and the json format."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import shlex
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb_system.config import Config
from lb_system.observability.log import LOGGER_NAME, configure_logging

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")


class LogSetup:
    """configure_logging() for a test: `start` points the lb_system logger at a config's file,
    `flush` waits until every queued line is written and closes the files."""

    def __init__(self) -> None:
        self.listener: logging.handlers.QueueListener | None = None

    def start(self, config: Config) -> logging.Logger:
        self.flush()
        self.listener = configure_logging(config.log, console=False)
        return logging.getLogger(LOGGER_NAME)

    def flush(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            listener.stop()
            for handler in listener.handlers:
                handler.close()


@pytest.fixture
def log_to() -> Iterator[LogSetup]:
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    setup = LogSetup()
    yield setup
    setup.flush()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handlers, level, propagate = saved
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def log_files(path: Path) -> list[Path]:
    """balancer.log and its backups, oldest first."""
    backups = sorted(path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    return [*backups, path]


def all_lines(path: Path) -> list[str]:
    lines = []
    for file in log_files(path):
        text = file.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n"), f"{file.name} ends in the middle of a line"
        lines.extend(text.splitlines())
    return lines


def test_rotation_splits_no_line_and_loses_none(make_config, log_to, tmp_path: Path) -> None:
    config = make_config(log={"max_bytes": 4096, "backups": 100})
    logger = log_to.start(config)

    def write(worker: int) -> None:
        for seq in range(300):
            logger.info("access worker=%d seq=%d pad=%s", worker, seq, "x" * (seq % 97))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log_to.flush()

    path = Path(config.log.file)
    files = log_files(path)
    assert len(files) > 10, "the test should have rotated many times"
    assert all(f.stat().st_size <= 4096 for f in files)
    seen: dict[int, list[int]] = {w: [] for w in range(4)}
    for line in all_lines(path):
        assert TEXT_LINE.match(line), line
        fields = dict(word.split("=", 1) for word in line.split()[3:])
        assert fields["pad"] == "x" * (int(fields["seq"]) % 97)  # the whole line, not a piece
        seen[int(fields["worker"])].append(int(fields["seq"]))
    assert all(seqs == list(range(300)) for seqs in seen.values())  # none lost, each in order


def test_rotation_keeps_only_the_configured_backups(make_config, log_to) -> None:
    config = make_config(log={"max_bytes": 1024, "backups": 2})
    logger = log_to.start(config)
    for seq in range(500):
        logger.info("access seq=%d", seq)
    log_to.flush()
    path = Path(config.log.file)
    assert [f.name for f in log_files(path)] == ["balancer.log.2", "balancer.log.1", "balancer.log"]
    seqs = [int(line.rsplit("=", 1)[1]) for line in all_lines(path)]
    assert seqs == list(range(seqs[0], 500))  # the newest lines, contiguous, ending with the last


def test_a_traceback_stays_in_the_file_of_its_record(make_config, log_to) -> None:
    config = make_config(log={"max_bytes": 1500, "backups": 50})
    logger = log_to.start(config)
    for seq in range(40):
        try:
            raise ZeroDivisionError(f"boom {seq}")
        except ZeroDivisionError:
            logger.exception("unhandled error seq=%d", seq)
    log_to.flush()
    for file in log_files(Path(config.log.file)):
        text = file.read_text(encoding="utf-8")
        headers = re.findall(r"unhandled error seq=(\d+)", text)
        tails = re.findall(r"ZeroDivisionError: boom (\d+)", text)
        assert headers == tails, file.name


async def test_json_lines_parse_and_carry_the_same_fields_as_text(make_config, start_system, log_to, http) -> None:
    """The same requests logged once as text and once as json give the same fields."""
    documents: dict[str, list[dict[str, object]]] = {}
    for form in ("text", "json"):
        config = make_config(log={"format": form, "file": f"{form}.log"}, database={"path": f"{form}.db"})
        log_to.start(config)
        system = await start_system(config)
        for path in ("/tasks/555", "/debug/crash"):
            async with http.get(system.balancer_url + path, headers={"X-Request-ID": f"{form}-{path[1:6]}"}) as r:
                await r.read()
        await system.stop()
        log_to.flush()
        documents[form] = parse(Path(config.log.file), form)

    text_access = [d for d in documents["text"] if d["event"] == "access"]
    json_access = [d for d in documents["json"] if d["event"] == "access"]
    assert len(json_access) == len(text_access) == 2
    for from_text, from_json in zip(text_access, json_access):
        assert set(from_json) == set(from_text) | {"logger"}
        varying = ("time", "request_id", "duration_ms", "logger")  # differ between the two runs
        assert {k: v for k, v in from_json.items() if k not in varying} == {
            k: v for k, v in from_text.items() if k not in varying
        }
    assert {d["request_id"] for d in json_access} == {"json-tasks", "json-debug"}
    assert {d["status"] for d in json_access} == {"404", "500"}
    crash = next(d for d in documents["json"] if d["event"] == "unhandled error")
    assert "ZeroDivisionError" in str(crash["traceback"])
    assert crash["level"] == "ERROR" and crash["path"] == "/debug/crash"


def parse(path: Path, form: str) -> list[dict[str, object]]:
    """One dict per record: json lines load as they are; text lines split like the json formatter."""
    records: list[dict[str, object]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if form == "json":
            document = json.loads(line)  # every line, tracebacks included, is one JSON object
            assert isinstance(document, dict) and {"time", "level", "event"} <= set(document)
            records.append(document)
        elif TEXT_LINE.match(line):
            stamp, level, message = line.split(" ", 2)
            words = shlex.split(message)
            event = " ".join(w for w in words if "=" not in w)
            fields = dict(w.split("=", 1) for w in words if "=" in w)
            records.append({"time": stamp, "level": level, "event": event, **fields})
    return records
