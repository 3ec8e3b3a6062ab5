"""The access line: one INFO record per request, built as fields on the hot path.

With `[log] access_file` set, the line's time and fields go to that file's buffer instead
(log.AccessFile): no record is made at all, and its thread writes them in batches.

`AccessLog.write` makes what `logger.info("access", extra={"fields": {...}})` makes, without
what that call spends per line and a hot path can do without: the caller's frame lookup, the
record's __init__ and the `extra` merge. Rendering (text or JSON) happens on the log thread.
Measured by benchmarks/access_log_bench.py (Python 3.11, 2026-11-29, a shared 2-core box under
load ~7, so noisy): µs per line in the caller, record built and queued for the log thread,
best run (range over 5 runs):
    AccessLog.write                        3.9 µs  (3.9-8.7)
    logger.info("access", extra=fields)    5.8 µs  (5.8-12.7)
Rendering then costs the log thread, not the event loop, about 5 µs per line, text or JSON.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from lb_system.observability.log import FIELDS, HandOff


class AccessLog:
    """Writes access records through `logger` and its handlers, in the fields every formatter renders."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._template: dict[str, object] | None = None
        self._thread: int | None = None

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
        **more: object,
    ) -> None:
        """One access line: `access method=... path=... status=... backend=... duration_ms=...
        request_id=... tries=...`, then `client`, `reason` and `more` when not None.
        None is `-` in text and null in JSON: `backend` None, the balancer answered itself;
        `method`, `path` and `tries` None, a request refused before it was parsed."""
        if not self.logger.isEnabledFor(logging.INFO):
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
        for key, value in more.items():
            if value is not None:
                fields[key] = value
        handlers = self.logger.handlers
        if len(handlers) == 1 and type(handlers[0]) is HandOff:
            access_file = handlers[0].access_file
            if access_file is not None:  # `[log] access_file`: its writer renders and writes in batches
                access_file.append(time.time(), fields)
                return
        self._emit(fields)

    def _emit(self, fields: dict[str, object]) -> None:
        logger = self.logger
        if logging.getLogRecordFactory() is not logging.LogRecord:
            logger.info("access", extra={FIELDS: fields})  # someone customised records: build them their way
            return
        thread = threading.get_ident()
        if self._template is None or self._thread != thread:
            # A real record made once on this thread: everything but the time and fields is the same.
            self._template = dict(logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, "access", (), None).__dict__)
            self._thread = thread
        template = self._template
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__.update(template)
        created = time.time()
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        record.relativeCreated = template["relativeCreated"] + (created - template["created"]) * 1000  # type: ignore[operator]
        record.__dict__[FIELDS] = fields
        if "taskName" in template:  # Python 3.12+ names the asyncio task, as LogRecord.__init__ does
            record.__dict__["taskName"] = _task_name()
        handlers = logger.handlers
        if len(handlers) == 1 and not (logger.filters or logger.disabled or logger.propagate):
            handler = handlers[0]
            # The queue hand-off `configure_logging` installs, alone and unfiltered: what
            # logger.handle would do in the end (its prepare returns a fields record as it is),
            # without the filter passes and the handler's lock.
            if type(handler) is HandOff and not handler.filters and handler.level <= logging.INFO:
                handler.queue.put_nowait(record)
                return
        logger.handle(record)


def _task_name() -> str | None:
    if not getattr(logging, "logAsyncioTasks", False):  # Python 3.12+
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return None
    return task.get_name() if task is not None else None
