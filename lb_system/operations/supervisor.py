"""`--processes N`: one parent keeping N balancer processes running on one shared port.

The parent serves nothing. It starts N children (the same command line with `--instance-index`),
forwards SIGTERM, SIGINT and SIGHUP to them, and restarts a child that dies, after a back-off
that doubles while restarts keep failing fast. Each child is a whole instance: its own checks,
stats, log file and reloads. POSIX only: [balancer] reuse_port, which several processes on one
port need, is refused where the platform lacks it (Windows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lb_system.observability.log import FIELDS

# The environment variable naming the parent's pid in each child: a child whose parent is gone
# (killed with SIGKILL, it could forward nothing) stops by itself (see `parent_watch`).
PARENT_PID_ENV = "LB_SUPERVISOR_PID"
# A child's exit status that means it could not start (a busy port: 1, a config error: 2).
# On its first start, the group gives up with it instead of retrying a mistake forever.
START_UP_FAILURES = frozenset({1, 2})


@dataclass(frozen=True)
class BackOff:
    """Seconds before a restart: `first`, doubled for each child death within `stable_after`
    seconds of its start, up to `longest`; a child that ran `stable_after` starts over at `first`."""

    first: float = 0.5
    longest: float = 30.0
    stable_after: float = 10.0

    def delay(self, quick_deaths: int) -> float:
        return float(min(self.longest, self.first * 2 ** max(0, quick_deaths - 1)))


class Supervisor:
    """Runs `count` children made by `command(index)`; `await run()` until told to stop."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        count: int,
        *,
        logger: logging.Logger,
        stop_timeout: float,
        env: Mapping[str, str] | None = None,
        back_off: BackOff = BackOff(),
    ) -> None:
        self.command = command
        self.env = dict(os.environ if env is None else env) | {PARENT_PID_ENV: str(os.getpid())}
        self.count = count
        self.logger = logger
        self.stop_timeout = stop_timeout  # after the stop signal, how long children get before SIGKILL
        self.back_off = back_off
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._failed_start: int | None = None

    # --- signals -----------------------------------------------------------------------------

    def forward(self, sig: int) -> None:
        """Pass `sig` to every running child; SIGTERM and SIGINT also stop the group."""
        if sig in (signal.SIGTERM, signal.SIGINT) and not self._stopping.is_set():
            self.logger.info("stopping", extra={FIELDS: {"signal": signal.Signals(sig).name, "children": len(self.children)}})
            self._stopping.set()
        elif sig == getattr(signal, "SIGHUP", None):
            self.logger.info("reload forwarded", extra={FIELDS: {"signal": "SIGHUP", "children": len(self.children)}})
        for child in self.children.values():
            if child.returncode is None:
                child.send_signal(sig)

    def install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        for sig in signals:
            loop.add_signal_handler(sig, self.forward, sig)
        return list(signals)

    # --- children ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Start the children and keep them running; 0 once all stopped after a signal, else the
        status of a child that could not start."""
        self.logger.info("supervisor started", extra={FIELDS: {"processes": self.count, "pid": os.getpid()}})
        await asyncio.gather(*(self._keep(index) for index in range(self.count)))
        self.logger.info("stopped", extra={FIELDS: {"processes": self.count}})
        return self._failed_start or 0

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        # A process group of its own: a Ctrl-C in the terminal reaches the parent alone, which
        # forwards it once (a child given two would take the second as "exit at once").
        child = await asyncio.create_subprocess_exec(*self.command(index), env=self.env, process_group=0)
        self.children[index] = child
        self.logger.info("child started", extra={FIELDS: {"index": index, "pid": child.pid}})
        return child

    async def _keep(self, index: int) -> None:
        quick_deaths = 0
        first = True
        while not self._stopping.is_set():
            started = time.monotonic()
            child = await self._spawn(index)
            if self._stopping.is_set():  # a signal arrived while it was being made
                child.send_signal(signal.SIGTERM)
            status = await self._wait(child)
            if self._stopping.is_set():
                break
            lived = time.monotonic() - started
            quick_deaths = quick_deaths + 1 if lived < self.back_off.stable_after else 1
            if first and status in START_UP_FAILURES and lived < self.back_off.stable_after:
                self.logger.error("child could not start", extra={FIELDS: {"index": index, "pid": child.pid, "status": status}})
                self._failed_start = status
                self.forward(signal.SIGTERM)
                break
            first = False
            delay = self.back_off.delay(quick_deaths)
            fields: dict[str, object] = {"index": index, "pid": child.pid, "status": _status_name(status)}
            fields |= {"uptime_s": round(lived, 3), "restart_in_s": delay}
            self.logger.error("child exited", extra={FIELDS: fields})
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                continue
        self.children.pop(index, None)

    async def _wait(self, child: asyncio.subprocess.Process) -> int:
        """The child's exit status; once the group is stopping, SIGKILL after `stop_timeout`."""
        waiting = asyncio.ensure_future(child.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                try:
                    await asyncio.wait_for(asyncio.shield(waiting), self.stop_timeout)
                except TimeoutError:
                    self.logger.error("child killed", extra={FIELDS: {"pid": child.pid, "after_s": self.stop_timeout}})
                    child.kill()
            return await waiting
        finally:
            stopping.cancel()


def _status_name(status: int) -> str:
    """An exit status as a person reads it: `1`, or `SIGKILL` for a child killed by a signal."""
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            pass
    return str(status)


async def parent_watch(parent_pid: int, on_gone: Callable[[], None], *, interval: float = 1.0) -> None:
    """Call `on_gone` once the process that started this one has died (it was re-parented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(interval)
    on_gone()
