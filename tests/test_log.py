"""The log file: the cheap access-log path writes what Logger.info would, and rotation holds."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb_system.config import LogConfig
from lb_system.observability.log import LOGGER_NAME, LineLogger, configure_logging


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path, list]]:
    """Sets the lb_system logger up as `python run.py` does; yields (setup, stop)."""
    stopped = []

    def setup(**log: object) -> tuple[logging.Logger, Path]:
        config = LogConfig(file=str(tmp_path / "balancer.log"), **log)
        stopped.append(configure_logging(config, console=False))
        return logging.getLogger(LOGGER_NAME), Path(config.file)

    def stop() -> None:
        while stopped:
            listener = stopped.pop()
            listener.stop()
            for handler in listener.handlers:
                handler.close()

    yield setup, stop
    stop()
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_line_logger_writes_the_same_line_as_logger_info(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    logger.info("access method=%s path=%s status=%d", "GET", "/tasks/1", 200)
    LineLogger(logger).info("access method=GET path=/tasks/1 status=200")
    stop()
    first, second = _lines(path)
    # "<time> INFO access ...": identical but for the time stamp.
    assert first.split(" ", 1)[1] == second.split(" ", 1)[1] == "INFO access method=GET path=/tasks/1 status=200"
    assert first.endswith("status=200") and second[:4].isdigit() and second[23] == "Z"


def test_line_logger_json_lines_carry_the_fields(configured) -> None:
    setup, stop = configured
    logger, path = setup(format="json")
    LineLogger(logger).info("access method=GET path=/x status=404 request_id=abc")
    stop()
    (line,) = _lines(path)
    assert '"event": "access"' in line and '"status": "404"' in line and '"logger": "lb_system"' in line


def test_line_logger_respects_the_level(configured) -> None:
    setup, stop = configured
    logger, path = setup(level="WARNING")
    line_logger = LineLogger(logger)
    assert not line_logger.enabled()
    logger.setLevel(logging.INFO)
    assert line_logger.enabled()


def test_records_with_arguments_and_tracebacks_are_still_rendered(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("unhandled error path=%s", "/boom")
    stop()
    text = path.read_text(encoding="utf-8")
    assert "ERROR unhandled error path=/boom" in text and "ZeroDivisionError" in text


def test_rotation_keeps_every_file_under_max_bytes_and_loses_no_recent_line(configured) -> None:
    setup, stop = configured
    logger, path = setup(max_bytes=2000, backups=3)
    line_logger = LineLogger(logger)
    for number in range(120):
        line_logger.info(f"access n={number:04d} " + "x" * 40)
    stop()
    files = [path, *(path.with_name(f"{path.name}.{i}") for i in (1, 2, 3))]
    assert all(f.exists() and f.stat().st_size < 2000 for f in files)
    kept = [line for f in reversed(files) for line in _lines(f)]
    numbers = [int(line.split("n=")[1][:4]) for line in kept]
    assert numbers == list(range(numbers[0], 120))  # the newest lines, in order, none missing
    assert not path.with_name(f"{path.name}.4").exists()
