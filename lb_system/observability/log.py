"""balancer.log and the console: one self-contained line per event, written off the event loop."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import logging.handlers
import os
import queue
import shlex
import sys
import threading
import time
from pathlib import Path

from lb_system.config import LogConfig

LOGGER_NAME = "lb_system"


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime
    # (whole second, its text): consecutive lines mostly share the second, and strftime is slow.
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - stdlib name
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(second)))
        return f"{cached[1]}.{int(record.msecs):03d}Z"


class TextFormatter(_UTCFormatter):
    """`<time> <LEVEL> <event> key=value ...`, traceback lines indented under it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")


class JsonFormatter(_UTCFormatter):
    """One JSON object per line with the same fields as the text line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, fields = _split_fields(message)
        document: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "event": event,
            **fields,
        }
        if record.exc_text:
            document["traceback"] = record.exc_text
        return json.dumps(document)


def _split_fields(message: str) -> tuple[str, dict[str, str]]:
    """ "access method=GET path=/x" -> ("access", {"method": "GET", "path": "/x"})."""
    try:
        words = shlex.split(message, posix=True)
    except ValueError:
        return message, {}
    event_words, fields = [], {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.isidentifier():
            fields[key] = value
        elif not fields:
            event_words.append(word)
    return " ".join(event_words), fields


class _HandOff(logging.handlers.QueueHandler):
    """Renders the message and traceback in the caller, leaves the layout to the file's formatter."""

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

    def handle_batch(self, records: list[logging.LogRecord], *, filtered: bool = False) -> None:
        lines = []
        for record in records:
            if filtered or self.filter(record):
                try:
                    lines.append(self.format(record) + self.terminator)
                except Exception:
                    self.handleError(record)
        if not lines:
            return
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write_lines(lines)
            except Exception:
                self.handleError(records[-1])

    def _write_lines(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.flush()


class _FileHandler(_BatchStreamHandler, logging.handlers.RotatingFileHandler):
    """RotatingFileHandler with the same rule (roll over before a line would reach max_bytes),
    but each line formatted once and the file's size kept in memory: the stock handler formats
    every record twice and stats, seeks and flushes the file per line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._size: int | None = None
        self._rolls = False

    def _open(self):  # noqa: ANN202 - stdlib signature
        stream = super()._open()
        self._size = None
        return stream

    def _opened(self) -> None:
        if self.stream is None:
            self.stream = self._open()
        if self._size is None:
            self.stream.seek(0, 2)
            self._size = self.stream.tell()
            # bpo-45401: never roll over anything but a regular file.
            self._rolls = self.maxBytes > 0 and os.path.isfile(self.baseFilename)

    def _write_lines(self, lines: list[str]) -> None:
        self._opened()
        pending: list[str] = []
        pending_size = 0
        for line in lines:
            # An empty file is never rolled over, even by a line longer than max_bytes.
            if self._rolls and self._size + pending_size + len(line) >= self.maxBytes and (pending or self._size):
                self.stream.write("".join(pending))
                pending, pending_size = [], 0
                self.doRollover()
                self._opened()
            pending.append(line)
            pending_size += len(line) if line.isascii() else len(line.encode(self.encoding or "utf-8"))
        self.stream.write("".join(pending))
        self.flush()
        self._size += pending_size


class _BatchListener(logging.handlers.QueueListener):
    """Takes everything waiting in the queue at each wake-up and hands it over as one batch."""

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
            self._handle_batch(batch)
            if stop:
                return

    def _handle_batch(self, records: list[logging.LogRecord]) -> None:
        records = [self.prepare(record) for record in records]
        for handler in self.handlers:
            chosen = records if not self.respect_handler_level else [r for r in records if r.levelno >= handler.level]
            if isinstance(handler, _BatchStreamHandler):
                handler.handle_batch(chosen)
            else:
                for record in chosen:
                    handler.handle(record)


class LineLogger:
    """Logs ready-made INFO lines through a logger and its handlers, without what
    `Logger.info` spends per call that a hot path (the access log) can do without: the
    caller's frame lookup, the record's __init__ and, at the queue, a copy of the record."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._template: dict[str, object] | None = None
        self._thread: int | None = None

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def info(self, message: str) -> None:
        logger = self.logger
        if logging.getLogRecordFactory() is not logging.LogRecord:
            logger.info("%s", message)  # someone customised records: build them their way
            return
        thread = threading.get_ident()
        if self._template is None or self._thread != thread:
            # A real record made once on this thread: everything but the time and text is the same.
            self._template = dict(logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, "", (), None).__dict__)
            self._thread = thread
        template = self._template
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__.update(template)
        created = time.time()
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        record.relativeCreated = template["relativeCreated"] + (created - template["created"]) * 1000  # type: ignore[operator]
        record.msg = message
        if "taskName" in template:  # Python 3.12+ names the asyncio task, as LogRecord.__init__ does
            task = asyncio.current_task() if logging.logAsyncioTasks else None  # type: ignore[attr-defined]
            record.taskName = task.get_name() if task is not None else None  # type: ignore[attr-defined]
        logger.handle(record)


def configure_logging(config: LogConfig, *, console: bool = True) -> logging.handlers.QueueListener:
    """Route the lb_system logger through a queue to the file and the console, so a slow disk
    never blocks the event loop. Returns the started listener; stop it on exit to flush."""
    formatter: logging.Formatter = JsonFormatter() if config.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    path = Path(config.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = _FileHandler(path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8")
    file_handler.setFormatter(formatter)
    handlers.append(file_handler)
    if console:
        console_handler = _BatchStreamHandler(sys.stderr)
        console_handler.setFormatter(formatter)
        handlers.append(console_handler)

    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = _BatchListener(log_queue, *handlers, respect_handler_level=False)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(_HandOff(log_queue))
    logger.setLevel(config.level)
    logger.propagate = False
    listener.start()
    return listener
