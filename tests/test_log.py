"""The log's records: fields rendered as text and typed JSON, the access-log fast path, rotation."""

from __future__ import annotations

import ast
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lb_system.config import LogConfig
from lb_system.observability.access_log import AccessLog
from lb_system.observability.log import (
    FIELDS,
    LOGGER_NAME,
    AccessEntry,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    text_value,
    with_fields,
)


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[tuple[Callable[..., tuple[logging.Logger, Path]], Callable[[], None]]]:
    """Sets the lb_system logger up as `python run.py` does; yields (setup, stop)."""
    stopped = []

    def setup(**log: Any) -> tuple[logging.Logger, Path]:
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


ACCESS = {
    "method": "GET",
    "path": "/tasks/1",
    "status": 200,
    "backend": "backend-1",
    "duration_ms": 1.57,
    "request_id": "abc",
    "tries": "backend-1:200",
}


def test_access_log_writes_the_same_line_as_logger_info(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    logger.info("access", extra={FIELDS: ACCESS})
    AccessLog(logger).write(**ACCESS)  # type: ignore[arg-type]
    stop()
    first, second = _lines(path)
    expected = (
        "INFO access method=GET path=/tasks/1 status=200 backend=backend-1 duration_ms=1.57 request_id=abc tries=backend-1:200"
    )
    # "<time> INFO access ...": identical but for the time stamp.
    assert first.split(" ", 1)[1] == second.split(" ", 1)[1] == expected
    assert second[:4].isdigit() and second[23] == "Z"


def test_the_access_line_reaches_balancer_log_without_a_log_record(configured, monkeypatch) -> None:
    setup, stop = configured
    logger, path = setup()
    access = AccessLog(logger)

    def no_record(*args: object, **kwargs: object) -> None:
        raise AssertionError("a LogRecord was made for an access line")

    monkeypatch.setattr(logging.LogRecord, "__init__", no_record)
    monkeypatch.setattr(logging.Logger, "makeRecord", no_record)
    for number in range(3):
        access.write(**{**ACCESS, "request_id": f"n{number}"})  # type: ignore[arg-type]
    monkeypatch.undo()
    logger.warning("after")
    stop()
    lines = _lines(path)
    assert [line.split("request_id=")[1].split()[0] for line in lines[:3]] == ["n0", "n1", "n2"]
    assert lines[3].endswith("WARNING after")


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_queued_access_line_renders_as_its_record_would(formatter: TextFormatter | JsonFormatter) -> None:
    """A handler that needs a record gets the one `logger.info("access", extra=...)` makes."""
    entry = AccessEntry(1764300227.9995, dict(ACCESS), LOGGER_NAME)
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, "", 0, "access", None, None)
    record.created, record.msecs, record.__dict__[FIELDS] = entry.created, 999.0, dict(ACCESS)
    line = formatter.fields_line(entry.created, "INFO", LOGGER_NAME, "access", entry.fields)
    assert formatter.format(entry.as_record()) == formatter.format(record) == line
    assert "2025-11-28T03:23:47.999Z" in line


def test_access_log_adds_optional_fields_only_when_given(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    access = AccessLog(logger)
    access.write(**{**ACCESS, "backend": None, "duration_ms": 2.004}, client="10.0.0.7", reason=None, cut=True)  # type: ignore[arg-type]
    stop()
    (line,) = _lines(path)
    assert line.endswith(" backend=- duration_ms=2.0 request_id=abc tries=backend-1:200 client=10.0.0.7 cut=true")


def test_json_lines_are_typed(configured) -> None:
    setup, stop = configured
    logger, path = setup(format="json")
    AccessLog(logger).write(**{**ACCESS, "backend": None}, cut=True)  # type: ignore[arg-type]
    logger.warning("backend down", extra={FIELDS: {"backend": "b", "reason": "refused", "active": 0, "up": False}})
    logger.info("clash", extra={FIELDS: {"event": "x", "level": 1}})
    stop()
    access, down, clash = (json.loads(line) for line in _lines(path))
    assert clash["event"] == "clash" and clash["level"] == "INFO" and clash["field_event"] == "x" and clash["field_level"] == 1
    assert access == {
        "time": access["time"],
        "level": "INFO",
        "logger": "lb_system",
        "event": "access",
        **ACCESS,
        "backend": None,
        "cut": True,
    }
    assert type(access["status"]) is int and type(access["duration_ms"]) is float
    assert down["event"] == "backend down" and down["active"] == 0 and down["up"] is False and down["level"] == "WARNING"


def test_access_log_respects_the_level(configured) -> None:
    setup, stop = configured
    logger, path = setup(level="WARNING")
    access = AccessLog(logger)
    assert not access.enabled()
    access.write(**ACCESS)  # type: ignore[arg-type]
    logger.setLevel(logging.INFO)
    assert access.enabled()
    stop()
    assert _lines(path) == []


def test_records_with_arguments_and_tracebacks_are_still_rendered(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("unhandled error path=%s", "/boom")
    stop()
    first, *traceback = _lines(path)
    assert first.endswith("ERROR unhandled error path=/boom")
    assert traceback[-1] == "  ZeroDivisionError: division by zero"
    assert all(line.startswith("  ") for line in traceback)  # a traceback line never passes for a record


FORGERIES = [
    "/tasks\n2026-01-01T00:00:00.000Z WARNING backend down backend=backend-1",
    "/tasks\r2026-01-01T00:00:00.000Z WARNING x",
    "/a b=c",
    '/it\'s "quoted" \\ back\\slash',
    "/line\u2028separator\x85next\x1c\x7f\x00\x1b[31m",
    "",
    "/café=1",
]


@pytest.mark.parametrize("value", FORGERIES)
def test_a_text_value_stays_one_word_and_reads_back_exactly(value: str) -> None:
    rendered = text_value(value)
    assert rendered.isprintable() and len(rendered.splitlines()) == 1  # no control character left, one line
    assert rendered.startswith("'") and ast.literal_eval(rendered) == value


def test_a_value_renders_the_same_the_first_time_and_from_the_memo_past_its_bound() -> None:
    # text_value keeps short strings as rendered: twice each value, and enough distinct ones to
    # empty the memo several times, must still give each value's own rendering.
    values = [*FORGERIES, "/tasks/1", "backend-1:200", "a b", "x" * 200] + [f"/p/{i} q" for i in range(3000)]
    first = [text_value(v) for v in values]
    assert [text_value(v) for v in values] == first
    assert first[-1] == "'/p/2999 q'" and text_value("/p/0 q") == "'/p/0 q'"
    for value, rendered in zip(values, first, strict=True):
        assert rendered == value or ast.literal_eval(rendered) == value


def test_a_line_renders_each_value_as_text_value_does() -> None:
    # with_fields inlines text_value's commonest cases (memoized strings, numbers).
    values: list[object] = [*FORGERIES, "/tasks/1", "/tasks/1", "GET", 200, -1, 1.5, 0.1 + 0.2, None, True, False, Path("a b")]
    fields = {f"k{i}": value for i, value in enumerate(values)}
    assert with_fields("access", fields) == "access " + " ".join(f"k{i}={text_value(v)}" for i, v in enumerate(values))
    assert with_fields("access", {}) == "access"


def test_plain_values_stay_bare() -> None:
    assert [text_value(v) for v in ("/tasks/1", "backend-1:200,b:503", 200, 1.5, None, True, False)] == [
        "/tasks/1",
        "backend-1:200,b:503",
        "200",
        "1.5",
        "-",
        "true",
        "false",
    ]


def test_a_classic_message_with_a_newline_stays_one_line(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    logger.info("something path=%s", "/x\n2026-01-01T00:00:00.000Z WARNING forged")
    stop()
    (line,) = _lines(path)
    assert line.endswith(r"INFO something path=/x\n2026-01-01T00:00:00.000Z WARNING forged")


def test_rotation_keeps_every_file_under_max_bytes_and_loses_no_recent_line(configured) -> None:
    setup, stop = configured
    logger, path = setup(max_bytes=2000, backups=3)
    access = AccessLog(logger)
    for number in range(120):
        access.write(**{**ACCESS, "request_id": f"n{number:04d}", "tries": "x" * 40})  # type: ignore[arg-type]
    stop()
    files = [path, *(path.with_name(f"{path.name}.{i}") for i in (1, 2, 3))]
    assert all(f.exists() and f.stat().st_size < 2000 for f in files)
    kept = [line for f in reversed(files) for line in _lines(f)]
    numbers = [int(line.split("request_id=n")[1][:4]) for line in kept]
    assert numbers == list(range(numbers[0], 120))  # the newest lines, in order, none missing
    assert not path.with_name(f"{path.name}.4").exists()


def test_each_line_is_rendered_once_for_the_file_and_the_console(configured, monkeypatch, capsys, tmp_path: Path) -> None:
    _, stop = configured  # restores the logger afterwards
    rendered: list[str] = []
    for name in ("format", "fields_line"):
        original = getattr(TextFormatter, name)

        def counted(self: TextFormatter, *args: Any, _original: Any = original, **kwargs: Any) -> str:
            line = _original(self, *args, **kwargs)
            rendered.append(line)
            return line

        monkeypatch.setattr(TextFormatter, name, counted)
    path = tmp_path / "both.log"
    listener = configure_logging(LogConfig(file=str(path)), console=True)
    logger = logging.getLogger(LOGGER_NAME)
    AccessLog(logger).write(**ACCESS)  # type: ignore[arg-type]
    logger.warning("backend down", extra={FIELDS: {"backend": "b"}})
    listener.stop()
    for handler in listener.handlers:
        handler.close()
    assert len(rendered) == 2  # not 4: the console writes the file's lines
    assert _lines(path) == rendered == capsys.readouterr().err.splitlines()


def _wait_for_lines(path: Path, count: int, within: float) -> list[str]:
    """The file's lines once it has `count` of them; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        lines = _lines(path) if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"{len(lines)} of {count} lines after {within} s"
        time.sleep(0.01)


def test_a_trickle_of_access_lines_reaches_balancer_log_within_a_second_each(configured) -> None:
    # The log thread pauses between batches (so a busy loop wakes it rarely): a lone line still goes out soon.
    setup, _ = configured
    logger, path = setup()
    access = AccessLog(logger)
    for number in range(4):
        access.write(**{**ACCESS, "request_id": f"t{number}"})  # type: ignore[arg-type]
        lines = _wait_for_lines(path, number + 1, within=1.0)
        assert f"request_id=t{number}" in lines[-1]


def test_a_burst_of_access_lines_is_whole_and_in_order_after_shutdown(configured) -> None:
    setup, stop = configured
    logger, path = setup()
    access = AccessLog(logger)
    expected = []
    for number in range(2000):
        if number % 500 == 250:
            logger.warning(f"mark{number}")
            expected.append(f"WARNING mark{number}")
        access.write(**{**ACCESS, "request_id": f"b{number}"})  # type: ignore[arg-type]
        expected.append(f"request_id=b{number}")
    stop()  # what a crash-free shutdown does: the queued lines are all written first
    lines = _lines(path)
    assert len(lines) == len(expected)
    for line, part in zip(lines, expected, strict=True):
        assert part in line
