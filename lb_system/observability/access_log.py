"""The access line: one INFO `access` line per request, built as fields on the hot path.

`AccessLog.write` writes what `logger.info("access", extra={"fields": {...}})` writes, without a
LogRecord: when the lb_system logger has only the queue hand-off `configure_logging` installs,
the line's time and fields go to the log thread (or, with `[log] access_file`, to that file's
buffer) as they are, and are rendered there. Otherwise (another handler, a filter, a custom
record factory) it is that `logger.info` call. Measured by benchmarks/access_log_bench.py
(Python 3.11, 2026-12-07, text, 20,000 lines, best of 5, a shared 2-core VM at load ~2-4),
µs per line in the caller / CPU µs per line on the writing thread:
    logger.info("access", extra=fields)     6.2-10.2
    AccessLog.write to balancer.log         1.7-1.8 / 4.0-4.1  (a LogRecord per line: 2.9 / 5.1-5.4)
    AccessLog.write with access_file        1.4     / 3.8-4.0
"""

from __future__ import annotations

import logging
import time

from lb_system.observability.log import FIELDS, HandOff


class AccessLog:
    """Writes access records through `logger` and its handlers, in the fields every formatter renders."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(
        self,
        *,
        method: str | None,
        path: str | None,
        status: int,
        backend: str | None,
        duration_ms: float,
        request_id: str,
        tries: str | None,
        client: str | None = None,
        reason: str | None = None,
        pool: str | None = None,
        route: str | None = None,
        **more: object,
    ) -> None:
        """One access line: `access method=... path=... status=... backend=... duration_ms=...
        request_id=... tries=...`, then `client`, `reason`, `pool`, `route` and `more` when not None.
        None is `-` in text and null in JSON: `backend` None, the balancer answered itself;
        `method`, `path` and `tries` None, a request refused before it was parsed."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, object] = {
            "method": method,
            "path": path,
            "status": status,
            "backend": backend,
            "duration_ms": round(duration_ms, 2),
            "request_id": request_id,
            "tries": tries,
        }
        if client is not None:
            fields["client"] = client
        if reason is not None:
            fields["reason"] = reason
        # Named, not in `more`: the forwarder passes them on every request (no dict to gather them).
        if pool is not None:
            fields["pool"] = pool
        if route is not None:
            fields["route"] = route
        if more:
            for key, value in more.items():
                if value is not None:
                    fields[key] = value
        handlers = logger.handlers
        if len(handlers) == 1 and not (logger.filters or logger.disabled or logger.propagate):
            handler = handlers[0]
            # The queue hand-off `configure_logging` installs, alone and unfiltered, and records
            # as the stdlib makes them: the line's time and fields go to the log thread as they are.
            if (
                type(handler) is HandOff
                and not handler.filters
                and handler.level <= logging.INFO
                and logging.getLogRecordFactory() is logging.LogRecord
            ):
                handler.write_access(time.time(), fields, logger.name)
                return
        logger.info("access", extra={FIELDS: fields})
