"""The lb_system logger's records, captured whatever the logging setup."""

from __future__ import annotations

import logging

from lb_system.observability.log import render_message


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
