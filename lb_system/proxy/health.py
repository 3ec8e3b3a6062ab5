"""Active health checks: every backend gets `GET <path>` each `interval` seconds of its pool's, and
passes when the answer's status is in `expect_status` and its body (its first 64 KiB) holds `expect_body`.

Checks go through the upstream transport, the proxied requests' one code path to the backends,
but each on a dedicated connection outside the capped pool: a backend busy with slow answers must
not look dead because its checks queued behind them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from lb_system.balancing.checks import check_verdict
from lb_system.balancing.events import CheckResult, Observer, Observers, Transition
from lb_system.balancing.pool import Backend
from lb_system.balancing.pools import Pools
from lb_system.observability.log import FIELDS
from lb_system.proxy.failures import classify
from lb_system.upstream.probe import Probe


class HealthChecker(Observer):
    """Checks every pool's backends, each pool at its own interval, and reports each result to the
    backend's pool and the observers.

    `start()` runs the periodic checks in a task that is restarted (and logged) if it ever ends
    unexpectedly; `stop()` ends it. While it runs it hears the pool's transitions: a backend's
    passive ejection is checked again as soon as its ejection time is over, not at the next round."""

    def __init__(
        self,
        pools: Pools,
        probe: Probe,
        *,
        observers: Observer | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.pools = pools
        self.probe = probe
        self.observers = observers if observers is not None else Observers()
        self.logger = logger or logging.getLogger("lb_system.health")
        self.restarts = 0
        self.task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wakeup = asyncio.Event()  # set: something changed, look again at when to check what
        self._round_now = False  # set with _wakeup by wake(): a whole round at once
        self._listening = False  # among the pool's observers (while started)
        self._after_ejection: dict[str, float] = {}  # backend -> the ejection end it was checked after

    async def check_backend(self, backend: Backend) -> bool:
        # Read through the pool at each check, so a reloaded [health] applies to the next round.
        pool = self.pools.pool_of(backend)
        until = backend.ejected_until
        if until is not None and until <= self.pools.clock():
            self._after_ejection[backend.name] = until
        settings = pool.check_settings(backend)
        started = time.perf_counter()
        error: str | None = None
        try:
            answer = await self.probe(backend.url + settings.path, settings.timeout, settings.host)
            status = str(answer.status)
            error = check_verdict(settings, answer.status, answer.body)
            ok = error is None
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # every failure is a failed check, never a crash of the loop
            ok, status = False, classify(failure).reason
        duration = time.perf_counter() - started
        try:
            pool.record_check(backend, ok, status, duration * 1000, error)
        except Exception:  # a bug in the pool must not stop the checks of the other backends
            self.logger.exception("recording a health check failed", extra={FIELDS: {"backend": backend.name}})
        self.observers.on_check(CheckResult(backend.name, ok, status, duration))
        return ok

    async def check_once(self) -> None:
        """One round over every backend of every pool, concurrently."""
        await self._check(self.pools.backends)

    async def _check(self, backends: Iterable[Backend]) -> None:
        checks = [self.check_backend(b) for b in backends]
        if checks:
            await asyncio.gather(*checks)

    def wake(self) -> None:
        """Start the next round now (after a reload or an admin action)."""
        self._round_now = True
        self._wakeup.set()

    def on_transition(self, backend: str, transition: Transition) -> None:
        # A backend went down, perhaps ejected: its ejection's end may come before the next round.
        if transition.to == "down":
            self._wakeup.set()

    def _ejections_to_check(self) -> tuple[float | None, list[Backend]]:
        """The earliest end (pool clock) of an ejection not yet checked after, and the backends
        whose ejection is over and who have had no check since."""
        now, checked = self.pools.clock(), self._after_ejection
        earliest: float | None = None
        over = []
        for backend in self.pools.backends:
            until = backend.ejected_until
            if until is None or checked.get(backend.name) == until:
                continue
            if until <= now:
                over.append(backend)
            elif earliest is None or until < earliest:
                earliest = until
        return earliest, over

    async def run(self) -> None:
        """Check each pool every `interval` seconds of its own (the first round is done by whoever
        starts the checker), and a backend at once when its ejection is over; a wake-up checks
        every pool at once."""
        loop = asyncio.get_running_loop()
        due: dict[str, float] = {}  # pool name -> when its next round starts
        while True:
            now = loop.time()
            pools = list(self.pools)
            for pool in pools:
                due.setdefault(pool.name, now + pool.health.interval)
            for name in due.keys() - {pool.name for pool in pools}:
                del due[name]  # removed by a reload
            earliest, over = self._ejections_to_check()
            if over:
                await self._check(over)
                continue
            wake_at = min(due.values(), default=now + 1.0)
            if earliest is not None:
                wake_at = min(wake_at, now + earliest - self.pools.clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that arrives as the
            # wake-up is set, and stop() then waits for a checker that goes on checking.
            try:
                async with asyncio.timeout(max(0.0, wake_at - now)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            now = loop.time()
            woken, self._round_now = self._round_now, False
            ready = [pool for pool in self.pools if woken or due.get(pool.name, now) <= now]
            for pool in ready:
                due[pool.name] = now + pool.health.interval
            await self._check(b for pool in ready for b in pool.backends)

    def start(self) -> None:
        """Run the checks in the background until `stop()`."""
        self._stopping = False
        if not self._listening:
            self._listening = True
            self.pools.observers.add(self)
        self.task = asyncio.create_task(self.run(), name="health-checker")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task is not self.task:
            return
        # Frozen health states are worse than a noisy log: say why, and check on.
        error = None if task.cancelled() else task.exception()
        self.restarts += 1
        reason = "cancelled" if error is None else classify(error).reason
        self.logger.error(
            "health checker ended unexpectedly, restarted",
            extra={FIELDS: {"reason": reason, "restarts": self.restarts}},
            exc_info=error,
        )
        self.start()

    async def stop(self) -> None:
        """End the background checks and wait for them to finish."""
        self._stopping = True
        if self._listening:
            self._listening = False
            self.pools.observers.remove(self)
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
