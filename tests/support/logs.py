"""The lb_system logger's records, captured whatever the logging setup."""

from __future__ import annotations

import logging
import logging.handlers

from lb_system.config import Config
from lb_system.observability.log import LOGGER_NAME, configure_logging, render_message


class LogRecords(logging.Handler):
    """Records of the lb_system logger at INFO and above, whatever the logging setup."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.INFO) -> list[str]:
        """Each record as its text line after time and level: `<event> key=value ...`."""
        return [render_message(r) for r in self.records if r.levelno >= level]


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
