"""The whole system in one event loop: the task store, the hosted backends, the balancer."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from lb_system.balancing.pool import DRAINING, Backend, BackendPool
from lb_system.config import BackendConfig, Config, ConfigError, load_config
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.log import LOGGER_NAME
from lb_system.operations.config_watch import ConfigWatcher
from lb_system.operations.reload_plan import BackendEdit, ReloadPlan, plan_reload
from lb_system.operations.serving import StartupError, bind_socket, dial_url, serve
from lb_system.proxy.admin import ActionRefused
from lb_system.proxy.balancer import FORWARDER, HEALTH_CHECKER, make_balancer_app
from lb_system.proxy.health import HealthChecker
from lb_system.tasks.api import make_backend_app
from lb_system.tasks.openapi import task_api_document
from lb_system.tasks.store import TaskStore


@dataclass
class HostedBackend:
    """A backend served by this process: its own runner on its own port."""

    config: BackendConfig
    runner: web.AppRunner | None  # None while stopped through the admin API
    url: str
    port: int
    host: str


async def wait_idle(backend: Backend, timeout: float | None = None) -> bool:
    """Wait until the backend has no request in flight; False if `timeout` seconds passed first."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while backend.active_requests > 0:
        if deadline is not None and loop.time() >= deadline:
            return False
        # Polled: the proxy's counters are plain ints, and a drain is rare and short.
        await asyncio.sleep(0.02)
    return True


class System:
    """Starts and stops everything in order; `async with System(config) as system:`.

    Given `config_path`, it watches that file and applies saved edits live (see `reload`).
    """

    def __init__(
        self,
        config: Config,
        *,
        logger: logging.Logger | None = None,
        config_path: str | Path | None = None,
        watch_interval: float = 0.5,
    ) -> None:
        self.config = config
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.tracker = ErrorTracker(config.errors.recent)
        self.store = TaskStore(config.database.path)
        self.hosted: dict[str, HostedBackend] = {}
        self.pool: BackendPool | None = None
        self.balancer_runner: web.AppRunner | None = None
        self.balancer_app: web.Application | None = None
        self.balancer_url = ""
        self.config_path = Path(config_path) if config_path is not None else None
        # The last rejected edit of the config file, shown in /status; None when the file is what runs.
        self.config_error: str | None = None
        self.watch_interval = watch_interval
        self._watcher: ConfigWatcher | None = None
        # Membership changes (reload, admin stop/start) happen one at a time.
        self._changes = asyncio.Lock()
        self._stopping = False
        # Removed backends' servers awaiting their drain, and the backend each one served.
        self._draining_runners: dict[web.AppRunner, HostedBackend] = {}
        self._reload_after_drain = False  # an edit was refused because a draining server held its port
        self._closing: set[asyncio.Task[None]] = set()  # runner cleanups in progress: awaited, never cancelled
        self._tasks: set[asyncio.Task[None]] = set()  # waits (drains, signalled reloads): cancelled on stop

    async def __aenter__(self) -> System:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        try:
            await self.store.open()
        except Exception as error:
            raise StartupError(f"cannot open database {config.database.path}: {error}") from None
        # Bind every port before serving anything: a busy port stops start-up with nothing half-open.
        balancer_sock = bind_socket(config.balancer.host, config.balancer.port)
        sockets = {}
        urls: dict[str, str] = {}
        try:
            for backend in config.backends:
                if backend.hosted:
                    sockets[backend.name] = self._bind(backend)
            for backend in config.backends:
                if backend.hosted:
                    hosted = await self._start_hosted(backend, sockets.pop(backend.name))
                    self.hosted[backend.name] = hosted
                    urls[backend.name] = hosted.url
                else:
                    assert backend.url is not None
                    urls[backend.name] = backend.url.rstrip("/")
        except BaseException:
            balancer_sock.close()
            for sock in sockets.values():
                sock.close()
            raise

        self.pool = BackendPool.from_config(
            config.backends, urls, health=config.health, strategy=config.balancer.strategy, logger=self.logger
        )
        for member in self.pool.backends:
            member.listening = True if member.hosted else None
        self.balancer_app = make_balancer_app(
            config,
            pool=self.pool,
            tracker=self.tracker,
            logger=self.logger,
            control=self,
            forwarded_api=task_api_document(debug_endpoints=config.api.debug_endpoints),
        )
        port = balancer_sock.getsockname()[1]
        self.balancer_runner = await self._serve(self.balancer_app, balancer_sock, keepalive_timeout=config.proxy.idle_timeout)
        self.balancer_url = dial_url(config.balancer.host, port)
        self.logger.info(
            "started balancer=%s backends=%s",
            self.balancer_url,
            ",".join(f"{b.name}@{urls[b.name]}" for b in config.backends),
        )
        if self.config_path is not None:
            self._watcher = ConfigWatcher(
                self.config_path, lambda: self._reload_quietly("file"), interval=self.watch_interval, logger=self.logger
            )
            self._watcher.start()

    def _bind(self, backend: BackendConfig) -> socket.socket:
        assert backend.port is not None
        return bind_socket(backend.host or self.config.balancer.host, backend.port)

    async def _start_hosted(self, backend: BackendConfig, sock: socket.socket) -> HostedBackend:
        host = backend.host or self.config.balancer.host
        port = sock.getsockname()[1]
        runner = await self._serve(self._make_backend(backend.name), sock)
        return HostedBackend(backend, runner, dial_url(host, port), port, host)

    def _make_backend(self, name: str) -> web.Application:
        return make_backend_app(name, store=self.store, tracker=self.tracker, api=self.config.api, logger=self.logger)

    async def _serve(self, app: web.Application, sock: socket.socket, **runner_options: float) -> web.AppRunner:
        runner_options.setdefault("shutdown_timeout", self.config.balancer.shutdown_grace)
        return await serve(app, sock, **runner_options)

    @property
    def health_checker(self) -> HealthChecker:
        """The balancer's health checker, available once started."""
        assert self.balancer_app is not None
        return self.balancer_app[HEALTH_CHECKER]

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_soon(self, runner: web.AppRunner) -> asyncio.Task[None]:
        """Close a server in the background; stop() waits for it rather than cancelling it halfway."""
        self._draining_runners.pop(runner, None)
        task = asyncio.create_task(runner.cleanup())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    # --- hot reload --------------------------------------------------------------------

    async def reload(self, origin: str = "admin") -> ReloadPlan:
        """Apply the saved config file live. An edit that cannot be applied changes nothing: it
        raises ConfigError, logged once and kept in `config_error` until a good edit arrives."""
        if self.config_path is None:
            raise ConfigError("no config file to reload: the system was started without one")
        async with self._changes:
            if self._stopping:
                raise ConfigError(f"{self.config_path}: not reloaded: the system is stopping")
            try:
                edited = await asyncio.to_thread(load_config, self.config_path)
                plan = plan_reload(self.config, edited, source=str(self.config_path))
                started = await self._prepare(plan)
            except ConfigError as error:
                self.config_error = str(error)
                self.logger.error("config reload rejected origin=%s error=%r", origin, str(error))
                raise
            self._apply(plan, started)
        self.config_error = None
        self.logger.info(
            "config reloaded origin=%s file=%s changes=%r", origin, self.config_path, "; ".join(plan.changes()) or "none"
        )
        return plan

    async def _reload_quietly(self, origin: str) -> None:
        try:
            await self.reload(origin)
        except ConfigError:
            pass  # logged and shown in /status by reload()

    def request_reload(self, origin: str) -> None:
        """Reload in the background (SIGHUP)."""
        self._spawn(self._reload_quietly(origin))

    async def _prepare(self, plan: ReloadPlan) -> dict[str, HostedBackend]:
        """Open and serve the ports the edit needs before anything is swapped: a busy port refuses
        the whole edit with nothing changed. The new servers are not in the pool yet."""
        wanted = [b for b in plan.added if b.hosted] + [e.new for e in plan.edited if e.moved and e.new.hosted]
        sockets: dict[str, socket.socket] = {}
        started: dict[str, HostedBackend] = {}
        try:
            for backend in wanted:
                try:
                    # In a thread: a host name means a DNS lookup, never on the loop while serving.
                    sockets[backend.name] = await asyncio.to_thread(self._bind, backend)
                except StartupError as error:
                    raise ConfigError(
                        f"{self.config_path}: [[backends]] ({backend.name}) port: {error}{self._held_by(backend)}; "
                        "the edit was not applied"
                    ) from None
            for backend in wanted:
                started[backend.name] = await self._start_hosted(backend, sockets.pop(backend.name))
        except BaseException:
            for sock in sockets.values():
                sock.close()
            for hosted in started.values():
                assert hosted.runner is not None
                await hosted.runner.cleanup()
            raise
        return started

    def _apply(self, plan: ReloadPlan, started: dict[str, HostedBackend]) -> None:
        """Swap in one step. No await in here: a request sees the old pool or the new one, never half."""
        assert self.pool is not None and self.balancer_app is not None
        pool, old, new = self.pool, self.config, plan.config
        current = {b.name: b for b in pool.backends}
        edits: dict[str, BackendEdit] = {e.name: e for e in plan.edited}
        members: list[Backend] = []
        for cfg in new.backends:
            backend = current.get(cfg.name)
            edit = edits.get(cfg.name)
            if backend is None:
                backend = Backend(name=cfg.name, url=self._url_of(cfg, started), hosted=cfg.hosted, weight=cfg.weight)
                backend.listening = True if cfg.hosted else None
            else:
                # Kept: same object, so health state, counters and history carry over.
                backend.weight = cfg.weight
                if edit is not None and edit.moved:
                    previous = self.hosted.pop(cfg.name, None)
                    if previous is not None and previous.runner is not None:
                        self._close_soon(previous.runner)  # in-flight requests to the old port finish
                    backend.url, backend.hosted = self._url_of(cfg, started), cfg.hosted
                    backend.listening = True if cfg.hosted else None
                    backend.awaiting_check = True
            if cfg.name in started:
                self.hosted[cfg.name] = started[cfg.name]
            elif cfg.hosted:
                self.hosted[cfg.name].config = cfg
            members.append(backend)

        pool.set_backends(members)
        if new.health != old.health:
            pool.health = new.health
            self.health_checker.wake()  # the next round follows the new interval, not the old one
        if new.balancer.strategy != old.balancer.strategy:
            pool.set_strategy(new.balancer.strategy)
        if new.errors.recent != old.errors.recent:
            self.tracker.recent = new.errors.recent
        if new.log.level != old.log.level:
            self.logger.setLevel(new.log.level)
        self.balancer_app[FORWARDER].apply_config(new)
        self.config = new

        for name in plan.removed:
            backend = current[name]
            backend.admin_state, backend.drained_at = DRAINING, None
            pool.retiring.append(backend)
            hosted = self.hosted.pop(name, None)
            runner = hosted.runner if hosted is not None else None
            if runner is not None:
                assert hosted is not None
                self._draining_runners[runner] = hosted
            self._spawn(self._retire(backend, runner))
        if plan.added or any(e.moved for e in plan.edited):
            self.health_checker.wake()

    @staticmethod
    def _url_of(cfg: BackendConfig, started: dict[str, HostedBackend]) -> str:
        if cfg.hosted:
            return started[cfg.name].url
        assert cfg.url is not None
        return cfg.url.rstrip("/")

    async def _retire(self, backend: Backend, runner: web.AppRunner | None) -> None:
        """A removed backend: no new requests; in-flight ones finish (up to drain_timeout),
        then its server, if hosted here, stops listening."""
        timeout = self.config.balancer.drain_timeout
        assert self.pool is not None
        if await wait_idle(backend, timeout):
            backend.drained_at = self.pool.clock()
            self.logger.info("backend drained backend=%s", backend.name)
        else:
            self.logger.warning(
                "backend drain timed out backend=%s active_requests=%d timeout=%s",
                backend.name,
                backend.active_requests,
                timeout,
            )
        if runner is not None:
            await asyncio.shield(self._close_soon(runner))
            backend.listening = False
        if backend in self.pool.retiring:
            self.pool.retiring.remove(backend)
        self.logger.info("backend removed backend=%s", backend.name)
        if runner is not None and self._reload_after_drain:
            # The port a refused edit wanted is free now: apply the saved file again.
            self._reload_after_drain = False
            self.request_reload("drained")

    def _held_by(self, backend: BackendConfig) -> str:
        """Why a port is busy, when it is a removed backend still draining."""
        for hosted in self._draining_runners.values():
            if hosted.port == backend.port and hosted.host == (backend.host or self.config.balancer.host):
                self._reload_after_drain = True
                return (
                    f" (held by {hosted.config.name}, removed and still draining; the edit is applied again once it has drained)"
                )
        return ""

    # --- admin actions -------------------------------------------------------------------

    def set_admin_state(self, backend: Backend, state: str) -> bool:
        """enable / disable / drain one backend; False when it already was in that state."""
        assert self.pool is not None
        changed = self.pool.set_admin_state(backend, state)
        if changed and state == DRAINING and backend.drained_at is None:
            self._spawn(self._watch_drain(backend))
        if changed:
            self.health_checker.wake()
        return changed

    async def _watch_drain(self, backend: Backend) -> None:
        assert self.pool is not None
        while backend.admin_state == DRAINING and backend.active_requests > 0:
            await wait_idle(backend, 0.5)
        if backend.admin_state == DRAINING and backend.drained_at is None:
            backend.drained_at = self.pool.clock()
            self.logger.info("backend drained backend=%s", backend.name)

    async def stop_backend(self, name: str) -> bool:
        """Close a hosted backend's listening socket (in-flight requests finish); False if already closed."""
        async with self._changes:
            hosted = self.hosted[name]
            if hosted.runner is None or self._stopping:
                return False
            runner, hosted.runner = hosted.runner, None
            assert self.pool is not None
            backend = self.pool.get(name)
            if backend is not None:
                backend.listening = False
            self.logger.warning("backend stopped backend=%s port=%d by=admin", name, hosted.port)
            await runner.cleanup()
        self.health_checker.wake()
        return True

    async def start_backend(self, name: str) -> bool:
        """Listen again on a stopped hosted backend's port; False if it is listening.
        ActionRefused when the port was taken meanwhile."""
        async with self._changes:
            hosted = self.hosted[name]
            if hosted.runner is not None or self._stopping:
                return False
            try:
                sock = await asyncio.to_thread(bind_socket, hosted.host, hosted.port)
            except StartupError as error:
                raise ActionRefused(str(error)) from None
            hosted.runner = await self._serve(self._make_backend(name), sock)
            assert self.pool is not None
            backend = self.pool.get(name)
            if backend is not None:
                backend.listening = True
            self.logger.info("backend started backend=%s port=%d by=admin", name, hosted.port)
        self.health_checker.wake()
        return True

    # --- shutdown --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting on every port at once, let in-flight requests finish (up to
        [balancer] shutdown_grace), then close the client pool and the database."""
        self._stopping = True
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            await watcher.stop()
        async with self._changes:
            pass  # a change in progress finishes; later ones see _stopping
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        backend_runners = [h.runner for h in self.hosted.values() if h.runner is not None]
        backend_runners += list(self._draining_runners.keys())
        balancer_runner, self.balancer_runner = self.balancer_runner, None
        for runner in [balancer_runner, *backend_runners]:
            if runner is not None:
                for site in list(runner.sites):
                    await site.stop()  # closes the listening socket; no await inside in practice
        # The balancer first: its in-flight requests still need the backends' open connections.
        if balancer_runner is not None:
            await balancer_runner.cleanup()
        await asyncio.gather(*(runner.cleanup() for runner in backend_runners), *self._closing)
        self.hosted.clear()
        self._draining_runners.clear()
        await self.store.close()
