"""Active health checks: every backend gets `GET <path>` each `interval` seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from lb_system.balancing.pool import Backend, BackendPool
from lb_system.config import HealthConfig
from lb_system.proxy.transport import describe_failure

CheckListener = Callable[[Backend, bool, float], None]


class HealthChecker:
    """Checks the pool's backends and reports each result to the pool."""

    def __init__(
        self,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.pool = pool
        self.session = session
        self.logger = logger or logging.getLogger("lb_system.health")
        self.listeners: list[CheckListener] = []
        self._wakeup = asyncio.Event()

    @property
    def config(self) -> HealthConfig:
        # Read through the pool so a reloaded [health] applies to the next round.
        return self.pool.health

    async def check_backend(self, backend: Backend) -> bool:
        config = self.config
        started = time.perf_counter()
        try:
            async with self.session.get(
                backend.url + config.path,
                timeout=aiohttp.ClientTimeout(total=config.timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
                status = str(response.status)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every failure is a failed check, never a crash of the loop
            ok, status = False, describe_failure(error)
        duration = time.perf_counter() - started
        self.pool.record_check(backend, ok, status, duration * 1000)
        for listener in self.listeners:
            listener(backend, ok, duration)
        return ok

    async def check_once(self) -> None:
        """One round over every backend, concurrently."""
        backends = list(self.pool.backends)
        if backends:
            await asyncio.gather(*(self.check_backend(b) for b in backends))

    def wake(self) -> None:
        """Start the next round now (after a reload or an admin action)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Check every `interval` seconds after the first round (done at start-up); cancelled on shutdown."""
        loop = asyncio.get_running_loop()
        next_round = loop.time() + self.config.interval
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, next_round - loop.time()))
            except TimeoutError:
                pass
            self._wakeup.clear()
            next_round = loop.time() + self.config.interval
            await self.check_once()
