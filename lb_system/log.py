"""balancer.log and the console: one self-contained line per event, written off the event loop."""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import queue
import shlex
import sys
import time
from pathlib import Path

from .config import LogConfig

LOGGER_NAME = "lb_system"


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - stdlib name
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


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
    """"access method=GET path=/x" -> ("access", {"method": "GET", "path": "/x"})."""
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
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()


def configure_logging(config: LogConfig, *, console: bool = True) -> logging.handlers.QueueListener:
    """Route the lb_system logger through a queue to the file and the console, so a slow disk
    never blocks the event loop. Returns the started listener; stop it on exit to flush."""
    formatter: logging.Formatter = JsonFormatter() if config.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    path = Path(config.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
    )
    file_handler.setFormatter(formatter)
    handlers.append(file_handler)
    if console:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(formatter)
        handlers.append(console_handler)

    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(log_queue, *handlers, respect_handler_level=False)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(_HandOff(log_queue))
    logger.setLevel(config.level)
    logger.propagate = False
    listener.start()
    return listener


def set_level(level: str) -> None:
    logging.getLogger(LOGGER_NAME).setLevel(level)
