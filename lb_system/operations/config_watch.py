"""Noticing that config.toml was saved: poll its size, mtime and content hash.

Polling keeps it dependency-free and portable (no inotify on Windows or in many containers);
a small file read twice a second costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from lb_system.observability.log import FIELDS

Fingerprint = tuple[int, int, str] | None  # (mtime_ns, size, sha256), None when the file is missing


def fingerprint(path: Path) -> Fingerprint:
    try:
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, digest


class ConfigWatcher:
    """Calls `on_change` once per settled edit of `path`.

    An edit counts once two polls in a row see the same new fingerprint, so an editor that is
    halfway through writing the file is not reported as a broken config.
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = 0.5,
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self.logger = logger or logging.getLogger("lb_system.config_watch")
        self._seen: Fingerprint = fingerprint(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="config-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        previous = self._seen
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(fingerprint, self.path)
            if current != self._seen and current == previous:
                self._seen = current
                try:
                    await self.on_change()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a failed reload is logged where it failed; keep watching
                    self.logger.exception("config reload failed", extra={FIELDS: {"file": str(self.path)}})
            previous = current
