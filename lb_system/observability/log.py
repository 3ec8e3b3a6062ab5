"""balancer.log and the console: one self-contained line per event, written off the event loop.

A record is an event name and ordered fields: `logger.info("backend down", extra={"fields":
{"backend": name, "reason": why}})`. The text and the JSON formatter both render those fields,
so a value a client sent can never split a line or add a field: in text, anything outside a safe
set of characters is quoted with its control characters escaped; in JSON it is a string.
"""

from __future__ import annotations

import collections
import copy
import io
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from lb_system.config import LogConfig

LOGGER_NAME = "lb_system"
# The LogRecord attribute that carries a record's fields (set through `extra={"fields": ...}`).
FIELDS = "fields"

# Text values outside this set are quoted: no space, quote, backslash, `=` or control character.
_SAFE = re.compile(r"[A-Za-z0-9._~:/@+,%*!?&;#^|()\[\]{}<>$-]+")
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(text: str) -> str:
    """`text` in single quotes, as Python's repr writes it but always with `'`: backslashes,
    quotes and every non-printable character (newlines, U+2028, DEL) escaped."""
    if text.isprintable() and "'" not in text and "\\" not in text:
        return f"'{text}'"
    out = []
    for char in text:
        escaped = _ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])  # \x7f, \x85, \u2028, ...
    return "'" + "".join(out) + "'"


# Short strings as rendered, by value: access lines repeat their methods, paths, backends and
# tries. Emptied when full, so neither a client's distinct paths nor long values can grow it.
_RENDERED: dict[str, str] = {}
_RENDERED_MAX, _RENDERED_LONGEST = 1024, 64


def text_value(value: object) -> str:
    """One field's value in a text line: numbers as written, None as `-`, booleans as
    `true`/`false`, strings bare when safe and quoted otherwise."""
    if type(value) is str:
        rendered = _RENDERED.get(value)
        if rendered is not None:
            return rendered
        if value.isalnum() and value.isascii():  # ids, methods, words: safe without the regex
            return value
        rendered = value if _SAFE.fullmatch(value) else quote(value)
        if len(value) <= _RENDERED_LONGEST:
            if len(_RENDERED) >= _RENDERED_MAX:
                _RENDERED.clear()
            _RENDERED[value] = rendered
        return rendered
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return repr(value)
    return text_value(str(value))


def fields_of(record: logging.LogRecord) -> Mapping[str, object]:
    """The record's fields; empty for a record logged the classic way."""
    fields = record.__dict__.get(FIELDS)
    return fields if isinstance(fields, Mapping) else {}


def render_message(record: logging.LogRecord) -> str:
    """`<event> key=value ...`: the text line after its time and level."""
    message = record.getMessage()
    if not message.isprintable():  # a classic record with a client's text in it
        message = quote(message)[1:-1]
    return with_fields(message, fields_of(record))


def with_fields(message: str, fields: Mapping[str, object]) -> str:
    """`<message> key=value ...`."""
    if not fields:
        return message
    # text_value's commonest cases inline: a line's values are mostly memoized strings and numbers.
    memo = _RENDERED
    parts = [message]
    for key, value in fields.items():
        if type(value) is str:
            text = memo.get(value)
            if text is None:  # ids and methods are words (not memoized: ids never repeat)
                text = value if value.isalnum() and value.isascii() else text_value(value)
        elif type(value) is int or type(value) is float:
            text = repr(value)
        else:
            text = text_value(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def json_value(value: object) -> object:
    """A field's value for JSON: numbers, booleans and None as themselves, anything else as text."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


class _UTCFormatter(logging.Formatter):
    # (whole second, its text): consecutive lines mostly share the second, and strftime is slow.
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - stdlib name
        return self.utc_time(record.created, record.msecs)

    def utc_time(self, created: float, msecs: float | None = None) -> str:
        """`created` (seconds since the epoch) as `2026-11-28T03:23:47.999Z`."""
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        if msecs is None:
            msecs = (created - second) * 1000  # as Python 3.11's LogRecord counts them
        return f"{cached[1]}.{int(msecs):03d}Z"

    def fields_line(self, created: float, level: str, logger: str, event: str, fields: Mapping[str, object]) -> str:
        """The line of a record without a traceback, from its parts (the access file's writer has no records)."""
        raise NotImplementedError

    def _traceback(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return ""  # nearly every record, the access lines among them
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        parts = [record.exc_text or "", record.stack_info or ""]
        return "\n".join(part for part in parts if part)


class TextFormatter(_UTCFormatter):
    """`<time> <LEVEL> <event> key=value ...`, traceback lines indented under it (so no line
    of a traceback, whatever its exception says, can pass for a record)."""

    def fields_line(self, created: float, level: str, logger: str, event: str, fields: Mapping[str, object]) -> str:
        return f"{self.utc_time(created)} {level} {with_fields(event, fields)}"

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {render_message(record)}"
        traceback = self._traceback(record)
        if traceback:
            line += "\n" + "\n".join("  " + part for part in traceback.splitlines())
        return line


_RECORD_KEYS = frozenset({"time", "level", "logger", "event", "traceback"})


class JsonFormatter(_UTCFormatter):
    """One JSON object per line with the same fields as the text line, typed, for log shippers."""

    def fields_line(self, created: float, level: str, logger: str, event: str, fields: Mapping[str, object]) -> str:
        return json.dumps(self._document(created, level, logger, event, fields))

    def format(self, record: logging.LogRecord) -> str:
        document = self._document(record.created, record.levelname, record.name, record.getMessage(), fields_of(record))
        traceback = self._traceback(record)
        if traceback:
            document["traceback"] = traceback
        return json.dumps(document)

    def _document(self, created: float, level: str, logger: str, event: str, fields: Mapping[str, object]) -> dict[str, Any]:
        document: dict[str, Any] = {"time": self.utc_time(created), "level": level, "logger": logger, "event": event}
        for key, value in fields.items():
            # A field never replaces the record's own keys: `event` as a field becomes `field_event`.
            document[f"field_{key}" if key in _RECORD_KEYS else key] = json_value(value)
        return document


class AccessEntry(NamedTuple):
    """An INFO `access` line on its way to the log thread: its time and fields, no LogRecord
    (AccessLog's fast path; the log thread renders it as it would the record)."""

    created: float
    fields: Mapping[str, object]
    logger: str

    def as_record(self) -> logging.LogRecord:
        """The record `logger.info("access", extra={"fields": ...})` would have made, for a handler that needs one."""
        record = logging.makeLogRecord({"name": self.logger, "msg": "access", "levelno": logging.INFO, "levelname": "INFO"})
        record.created, record.msecs = self.created, int((self.created - int(self.created)) * 1000) + 0.0
        record.__dict__[FIELDS] = self.fields
        return record


_new_tuple = tuple.__new__


class HandOff(logging.handlers.QueueHandler):
    """Renders the message and traceback in the caller, leaves the layout to the file's formatter.
    `access_file`, when set, is where the access lines go instead of the queue."""

    access_file: AccessFile | None = None

    def write_access(self, created: float, fields: Mapping[str, object], logger: str) -> None:
        """An access line without a LogRecord: to the access file, or queued for balancer.log."""
        if self.access_file is not None:
            self.access_file.append(created, fields)
        else:
            # tuple.__new__ in C, not the NamedTuple's __new__ in Python: the same AccessEntry.
            self.queue.put_nowait(_new_tuple(AccessEntry, (created, fields, logger)))

    def emit(self, record: logging.LogRecord) -> None:
        access_file = self.access_file
        if access_file is not None and record.msg == "access" and FIELDS in record.__dict__:
            access_file.append(record.created, record.__dict__[FIELDS])  # an AccessLog line that took the long way
            return
        super().emit(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not record.args and not record.exc_info and type(record.msg) is str:
            return record  # already rendered: nothing to change, so no copy to protect other handlers
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()


class _BatchStreamHandler(logging.StreamHandler):
    """Writes all the records the listener took off the queue at once: one write and one
    flush per batch instead of per line."""

    def emit(self, record: logging.LogRecord) -> None:
        self.handle_batch([record], filtered=True)

    def handle_batch(self, records: list[logging.LogRecord | AccessEntry], *, filtered: bool = False) -> None:
        lines = self.render(records, filtered=filtered)
        if lines:
            self.write_rendered(lines, records)

    def render(self, records: list[logging.LogRecord | AccessEntry], *, filtered: bool = False) -> list[str]:
        """Each record (that passes this handler's filters) as its line, terminator included."""
        lines = []
        formatter, terminator = self.formatter, self.terminator
        # Access lines straight from their fields, unless a filter or a foreign formatter needs records.
        fields_line = formatter.fields_line if isinstance(formatter, _UTCFormatter) and not self.filters else None
        for record in records:
            if type(record) is AccessEntry:
                if fields_line is not None:
                    lines.append(fields_line(record.created, "INFO", record.logger, "access", record.fields) + terminator)
                    continue
                record = record.as_record()
            assert isinstance(record, logging.LogRecord)
            if filtered or self.filter(record):
                try:
                    lines.append(self.format(record) + self.terminator)
                except Exception:
                    self.handleError(record)
        return lines

    def write_rendered(self, lines: list[str], records: list[logging.LogRecord | AccessEntry]) -> None:
        """Write `render`'s lines for `records`."""
        last = records[-1]
        self.write_batch(lines, last if isinstance(last, logging.LogRecord) else last.as_record())

    def write_batch(self, lines: list[str], record: logging.LogRecord | None = None) -> None:
        """Write whole lines (each ending in the terminator) with one write and one flush."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write_lines(lines)
            except Exception:
                self.handleError(record or logging.makeLogRecord({"msg": f"{len(lines)} lines lost"}))

    def _write_lines(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.flush()


class _FileHandler(_BatchStreamHandler, logging.handlers.RotatingFileHandler):
    """RotatingFileHandler with the same rule (roll over before a line would reach max_bytes),
    but each line formatted once and the file's size kept in memory: the stock handler formats
    every record twice and stats, seeks and flushes the file per line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._size: int | None = None
        self._rolls = False

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        self._size = None
        return stream

    def _opened(self) -> tuple[io.TextIOWrapper, int]:
        """The open file and its size."""
        stream = self.stream
        if stream is None:
            stream = self.stream = self._open()
        if self._size is None:
            stream.seek(0, 2)
            self._size = stream.tell()
            # bpo-45401: never roll over anything but a regular file.
            self._rolls = self.maxBytes > 0 and os.path.isfile(self.baseFilename)
        return stream, self._size

    def _write_lines(self, lines: list[str]) -> None:
        stream, size = self._opened()
        text = "".join(lines)
        total = len(text) if text.isascii() else len(text.encode(self.encoding or "utf-8"))
        if not self._rolls or size + total < self.maxBytes:  # the whole batch fits: no line needs the check
            stream.write(text)
            self.flush()
            self._size = size + total
            return
        pending: list[str] = []
        pending_size = 0
        for line in lines:
            length = len(line) if line.isascii() else len(line.encode(self.encoding or "utf-8"))  # in bytes
            # An empty file is never rolled over, even by a line longer than max_bytes.
            if self._rolls and size + pending_size + length >= self.maxBytes and (pending or size):
                stream.write("".join(pending))
                pending, pending_size = [], 0
                self.doRollover()
                stream, size = self._opened()
            pending.append(line)
            pending_size += length
        stream.write("".join(pending))
        self.flush()
        self._size = size + pending_size


class AccessFile:
    """The access log's own file (`[log] access_file`). The event loop only appends a line's time
    and fields to a buffer; one thread renders what gathered every `interval` seconds and writes
    it with one write, rotated by size as balancer.log is (no LogRecord, no queue per line)."""

    def __init__(self, handler: _FileHandler, formatter: _UTCFormatter, *, logger: str, interval: float = 0.2) -> None:
        self._handler = handler
        self._formatter = formatter
        self._logger = logger
        self.interval = interval
        # deque.append and popleft are atomic: the loop and the writer share it without a lock.
        self._waiting: collections.deque[tuple[float, Mapping[str, object]]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lb_system access log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def append(self, created: float, fields: Mapping[str, object]) -> None:
        """One INFO `access` line, written within `interval` seconds."""
        self._waiting.append((created, fields))

    def close(self) -> None:
        """Write every line appended so far and close the file."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write_waiting()
        self._handler.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write_waiting()

    def _write_waiting(self) -> None:
        waiting = self._waiting
        count = len(waiting)
        if not count:
            return
        line, logger, take = self._formatter.fields_line, self._logger, waiting.popleft
        try:
            lines = [line(created, "INFO", logger, "access", fields) + "\n" for created, fields in (take() for _ in range(count))]
        except Exception:
            self._handler.handleError(logging.makeLogRecord({"msg": f"{count} access lines lost"}))
            return
        self._handler.write_batch(lines)


class _BatchListener(logging.handlers.QueueListener):
    """Takes everything waiting in the queue at each wake-up and hands it over as one batch.

    After a batch it pauses `pause` seconds before taking the next: under traffic, lines gather
    in the queue meanwhile, so the event loop's put finds no thread to wake (a wake-up per line
    cost the loop a thread switch per request). Idle, it blocks on the queue and costs nothing."""

    queue: queue.SimpleQueue[logging.LogRecord | AccessEntry | None]
    _sentinel: None
    access_file: AccessFile | None = None
    pause = 0.05

    def stop(self) -> None:
        super().stop()
        if self.access_file is not None:
            self.access_file.close()

    def _monitor(self) -> None:
        q = self.queue
        while True:
            batch = [q.get()]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = self._sentinel in batch
            if stop:
                batch = batch[: batch.index(self._sentinel)]
            self._handle_batch(batch)  # type: ignore[arg-type] # the sentinel was cut off
            if stop:
                return
            time.sleep(self.pause)  # the log thread's own: the event loop never waits on it

    def _handle_batch(self, entries: list[logging.LogRecord | AccessEntry]) -> None:
        # The file and the console share one formatter (configure_logging): each line is
        # rendered once for both, not once per handler.
        rendered: dict[tuple[int, str], list[str]] = {}
        for handler in self.handlers:
            if isinstance(handler, _BatchStreamHandler) and not self.respect_handler_level:
                if handler.filters:
                    handler.handle_batch(entries)
                    continue
                key = (id(handler.formatter), handler.terminator)
                lines = rendered.get(key)
                if lines is None:
                    lines = rendered[key] = handler.render(entries, filtered=True)
                if lines:
                    handler.write_rendered(lines, entries)
                continue
            records = [entry if isinstance(entry, logging.LogRecord) else entry.as_record() for entry in entries]
            for record in records:
                if not self.respect_handler_level or record.levelno >= handler.level:
                    handler.handle(record)


def configure_logging(config: LogConfig, *, console: bool = True, access_interval: float = 0.2) -> logging.handlers.QueueListener:
    """Route the lb_system logger through a queue to the file and the console, so a slow disk
    never blocks the event loop; with `access_file`, the access lines to that file alone.
    The access file's writer wakes every `access_interval` seconds. Returns the started
    listener; stop it on exit to flush both."""
    formatter: _UTCFormatter = JsonFormatter() if config.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    path = Path(config.file_for(os.getpid()))
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = _FileHandler(path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8")
    file_handler.setFormatter(formatter)
    handlers.append(file_handler)
    if console:
        console_handler = _BatchStreamHandler(sys.stderr)
        console_handler.setFormatter(formatter)
        handlers.append(console_handler)

    log_queue: queue.SimpleQueue[logging.LogRecord | AccessEntry] = queue.SimpleQueue()
    listener = _BatchListener(log_queue, *handlers, respect_handler_level=False)
    hand_off = HandOff(log_queue)
    access_file = config.access_file_for(os.getpid())
    if access_file is not None:
        access_path = Path(access_file)
        access_path.parent.mkdir(parents=True, exist_ok=True)
        access_handler = _FileHandler(
            access_path, maxBytes=config.access_max_bytes, backupCount=config.access_backups, encoding="utf-8"
        )
        hand_off.access_file = listener.access_file = AccessFile(
            access_handler, formatter, logger=LOGGER_NAME, interval=access_interval
        )
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(hand_off)
    logger.setLevel(config.level)
    logger.propagate = False
    listener.start()
    if listener.access_file is not None:
        listener.access_file.start()
    return listener
