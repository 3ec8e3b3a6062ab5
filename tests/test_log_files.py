"""balancer.log: size-based rotation that loses and splits no line, and the json format."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import re
import threading
from functools import partial
from pathlib import Path

import pytest
from support.waiting import wait_for

from lb_system.balancing.pool import Backend
from lb_system.config import LogConfig
from lb_system.observability.log import LOGGER_NAME, configure_logging

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")
# A text record, strictly: time, level, event words, then ` key=value` fields to the end of the line,
# each value bare (no space or quote) or a single-quoted Python string literal.
_VALUE = r"(?:'(?:[^'\\]|\\.)*'|[^\s'\"\\=]+)"
_RECORD = re.compile(rf"^(\S+) ([A-Z]+) ([a-z][\w ]*?)((?: \w+={_VALUE})*)$")
_FIELD = re.compile(rf" (\w+)=({_VALUE})")


def parse_text_line(line: str) -> dict[str, object]:
    """{"time", "level", "event", field: value as str}, or AssertionError if the line is not one whole record."""
    match = _RECORD.match(line)
    assert match, f"not one whole record: {line!r}"
    stamp, level, event, fields = match.groups()
    values = {key: ast.literal_eval(value) if value.startswith("'") else value for key, value in _FIELD.findall(fields)}
    return {"time": stamp, "level": level, "event": event, **values}


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


def all_healthy(backends: list[Backend]) -> bool:
    return all(b.healthy for b in backends)


async def test_json_lines_parse_and_carry_the_same_fields_as_text(make_config, start_system, log_to, http) -> None:
    """The same requests logged once as text and once as json give the same fields."""
    documents: dict[str, list[dict[str, object]]] = {}
    for form in ("text", "json"):
        config = make_config(log={"format": form, "file": f"{form}.log"}, database={"path": f"{form}.db"})
        log_to.start(config)
        system = await start_system(config)
        await wait_for(partial(all_healthy, system.pool.backends), message="backends up")  # else a 503
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
        # Text has only words; JSON has the same values typed (a number where text wrote digits).
        assert {k: str(v) for k, v in from_json.items() if k not in varying} == {
            k: v for k, v in from_text.items() if k not in varying
        }
        assert type(from_json["duration_ms"]) is float and float(str(from_text["duration_ms"])) >= 0
    assert {d["request_id"] for d in json_access} == {"json-tasks", "json-debug"}
    assert {d["status"] for d in json_access} == {404, 500}
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
        elif not line.startswith("  "):  # a traceback's lines are indented under their record
            records.append(parse_text_line(line))
    return records


FORGED = "2026-01-01T00:00:00.000Z"
F = FORGED.encode()
# (method, request target as sent, the path an access record must then carry). The C parser refuses
# raw bytes outside ASCII that the pure-Python one accepts: those may get no access record.
ATTACKS: list[tuple[bytes, bytes, str]] = [
    (
        b"GET",
        b"/tasks%0a" + F + b"%20WARNING%20backend%20down%20backend=backend-1",
        f"/tasks\n{FORGED} WARNING backend down backend=backend-1",
    ),
    (b"GET", b"/tasks%0d" + F + b"%20WARNING%20x", f"/tasks\r{FORGED} WARNING x"),
    (b"GET", b"/tasks%0d%0a" + F + b"%20ERROR%20y", f"/tasks\r\n{FORGED} ERROR y"),
    (b"GET", b"/tasks/a'b\"c\\d%20status=999%20backend=evil", "/tasks/a'b\"c\\d status=999 backend=evil"),
    (b"GET", b"/tasks/%e2%80%a8" + F + b"%c2%85z%1b[31m%00%7f", f"/tasks/\u2028{FORGED}\x85z\x1b[31m\x00\x7f"),
    (b"GET", b"/tasks/\xc3\xa9\xe2\x80\xa8" + F, f"/tasks/\xe9\u2028{FORGED}"),
    (b"GET", b"/tasks/\x85" + F, f"/tasks/\udc85{FORGED}"),
    (b"X'Y", b"/tasks/1", "/tasks/1"),
    (b"POST", b"/admin/backends/b%0a" + F + b"%20WARNING%20x=y/disable", f"/admin/backends/b\n{FORGED} WARNING x=y/disable"),
]


async def raw_request(url: str, method: bytes, target: bytes, request_id: str) -> bytes:
    """Sends one request as raw bytes; returns the status line."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + request_id.encode())
        writer.write(b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return (await reader.read()).split(b"\r\n", 1)[0]
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("access_file", [None, "access.log"])
@pytest.mark.parametrize("form", ["text", "json"])
async def test_no_request_can_split_a_log_line_or_add_a_field(make_config, start_system, log_to, form: str, access_file) -> None:
    config = make_config(log={"format": form, "access_file": access_file})
    log_to.start(config)
    system = await start_system(config)
    answered = {}
    for number, (method, target, _) in enumerate(ATTACKS):
        status_line = await raw_request(system.balancer_url, method, target, f"forge-{number}")
        answered[number] = b"HTTP/1.1" in status_line  # the parser may refuse raw bytes (HTTP/1.0 400)
    await system.stop()
    log_to.flush()

    records = parse(Path(config.log.file), form)  # every line is one whole record, or parse fails
    if access_file is not None:  # the access lines in their own file, and only there
        assert not any(r["event"] == "access" for r in records)
        records += parse(Path(config.log.access_file), form)
    assert not any(str(r["time"]).startswith(FORGED[:10]) for r in records)
    access = {r["request_id"]: r for r in records if r["event"] == "access"}
    for number, (method, _target, path) in enumerate(ATTACKS):
        if not answered[number] or method == b"POST":
            continue
        record = access.pop(f"forge-{number}")
        assert set(record) - {"time", "level", "logger", "event"} == set(ACCESS_FIELDS), record
        assert record["method"] == method.decode() and record["path"] == path, record
    admin = [r for r in records if r["event"] == "admin"]
    assert [r["target"] for r in admin] == ["b\n" + FORGED + " WARNING x=y"] and admin[0]["action"] == "disable"
    assert sum(answered.values()) >= 6  # most attacks got through the parser to the balancer


ACCESS_FIELDS = ("method", "path", "status", "backend", "duration_ms", "request_id", "tries")


async def test_start_up_line_has_no_empty_field_and_stop_ends_the_log(make_config, start_system, log_to, monkeypatch) -> None:
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    config = make_config(backends=[])
    log_to.start(config)
    system = await start_system(config)
    await system.stop()
    await system.stop()  # a second stop logs nothing more
    log_to.flush()
    records = parse(Path(config.log.file), "text")
    started = next(r for r in records if r["event"] == "started")
    assert started["dashboard"] == system.balancer_url + "/" and started["admin"] == "off" and "backends" not in started
    assert [r["event"] for r in records[-2:]] == ["stopping", "stopped"]
    text = Path(config.log.file).read_text(encoding="utf-8")
    assert not re.search(r"=( |$)", text, re.MULTILINE)


def test_a_pid_in_the_file_name_gives_each_process_its_own_log(make_config, log_to, tmp_path: Path) -> None:
    config = make_config(log={"file": "logs/balancer-{pid}.log"})
    log_to.start(config).info("started")
    log_to.flush()
    own = tmp_path / "logs" / f"balancer-{os.getpid()}.log"
    assert [parse_text_line(line)["event"] for line in own.read_text(encoding="utf-8").splitlines()] == ["started"]
    assert not (tmp_path / "logs" / "balancer-{pid}.log").exists()


def test_batches_that_fit_are_written_whole_and_their_bytes_counted_for_the_next_rollover(tmp_path: Path) -> None:
    # A batch that fits is written in one go, a batch that does not line by line; both count bytes
    # (é and € take 2 and 3: the line-by-line check once counted characters and let a file reach
    # 1001 bytes), so every file stays under max_bytes, and every line is kept, in order.
    listener = configure_logging(LogConfig(file=str(tmp_path / "b.log"), max_bytes=1000, backups=9), console=False)
    (handler,) = listener.handlers
    try:
        for batch in range(24):
            handler.write_batch([f"{batch:02d} {n} é€\n" for n in range(10)])  # type: ignore[attr-defined]
    finally:
        listener.stop()
        handler.close()
        logger = logging.getLogger(LOGGER_NAME)
        for hand_off in list(logger.handlers):
            logger.removeHandler(hand_off)
    files = log_files(tmp_path / "b.log")
    assert len(files) == 3 and all(0 < f.stat().st_size < 1000 for f in files)  # 2640 bytes
    assert all_lines(tmp_path / "b.log") == [f"{batch:02d} {n} é€" for batch in range(24) for n in range(10)]
