"""Membership changes, one at a time: a reload of the config file and the admin actions
(enable, disable, drain, and stop or start a hosted backend's server) all go through here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from lb_system.balancing.pool import Backend, new_backend
from lb_system.balancing.pools import Pools
from lb_system.balancing.routes import RouteTable
from lb_system.config import BackendConfig, Config, ConfigError, check_role, load_config, missing_read_token
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.log import FIELDS
from lb_system.operations.reload_plan import BackendEdit, ReloadPlan, plan_reload
from lb_system.operations.serving import StartupError, bind_socket, dial_url, serve
from lb_system.operations.tls import ListenerCertificate, NewCertificate
from lb_system.proxy.admin import ActionRefused
from lb_system.proxy.balancer import Balancer
from lb_system.tasks.api import make_backend_app
from lb_system.tasks.store import SchemaTooNew, StoreUnavailable, TaskStore


@dataclass
class HostedBackend:
    """A backend served by this process: its own runner on its own port."""

    config: BackendConfig
    runner: web.AppRunner | None  # None while stopped through the admin API
    url: str
    port: int
    host: str


class Membership:
    """The running config, the servers of the backends hosted here, and every change to them.
    What the admin API drives (`proxy.admin.AdminControl`)."""

    def __init__(
        self,
        config: Config,
        *,
        store: TaskStore,
        tracker: ErrorTracker,
        logger: logging.Logger,
        config_path: Path | None = None,
        role: str = "all",
    ) -> None:
        self.config = config
        self.role = role
        self.tracker = tracker
        self.logger = logger
        self.config_path = config_path
        # The last rejected edit of the config file, shown in /status; None when the file is what runs.
        self.config_error: str | None = None
        self.hosted: dict[str, HostedBackend] = {}
        self.pool: Pools | None = None
        self._store = store
        self._store_open = False  # opened with the first hosted backend
        # The TLS listeners' certificates by config section ("balancer", "control"): a reload swaps them.
        self.certificates: dict[str, ListenerCertificate] = {}
        self._balancer: Balancer | None = None
        # Changes (reload, admin stop/start) happen one at a time.
        self._changes = asyncio.Lock()
        self._stopping = False
        # Removed backends' servers awaiting their drain, and the backend each one served.
        self._draining_runners: dict[web.AppRunner, HostedBackend] = {}
        self._reload_after_drain = False  # an edit was refused because a draining server held its port
        self._closing: set[asyncio.Task[None]] = set()  # runner cleanups in progress: awaited, never cancelled
        self._tasks: set[asyncio.Task[None]] = set()  # waits (drains, signalled reloads): cancelled on stop

    # --- start and stop (driven by System) --------------------------------------------------

    async def start_servers(self) -> dict[str, str]:
        """Bind every hosted backend's port, then serve each (a busy port stops start-up with
        nothing half-open); returns the URL of every backend, hosted or outside."""
        sockets: dict[str, socket.socket] = {}
        urls: dict[str, str] = {}
        try:
            for backend in self.config.backends:
                if backend.hosted:
                    sockets[backend.name] = self._bind(backend)
            for backend in self.config.backends:
                if backend.hosted:
                    hosted = await self._start_hosted(backend, sockets.pop(backend.name))
                    self.hosted[backend.name] = hosted
                    urls[backend.name] = hosted.url
                else:
                    assert backend.url is not None
                    urls[backend.name] = backend.url.rstrip("/")
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        return urls

    def attach(self, pool: Pools, balancer: Balancer) -> None:
        """The pools and the balancer that changes apply to, once the system has made them."""
        self.pool, self._balancer = pool, balancer

    async def stop_changes(self) -> list[web.AppRunner]:
        """No change after this: one in progress finishes, pending waits are cancelled. Returns
        the backend servers still open, for the system to close."""
        self._stopping = True
        async with self._changes:
            pass  # a change in progress finishes; later ones see _stopping
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return [h.runner for h in self.hosted.values() if h.runner is not None] + list(self._draining_runners)

    async def wait_closed(self) -> None:
        """Every server close started by a change has finished."""
        await asyncio.gather(*self._closing)
        self.hosted.clear()
        self._draining_runners.clear()

    async def open_store(self) -> None:
        """Open the task database, once: hosted backends serve the task API from it."""
        if self._store_open:
            return
        try:
            await self._store.open()
        except SchemaTooNew as error:
            raise StartupError(str(error)) from None
        except (StoreUnavailable, OSError) as error:
            raise StartupError(f"cannot open database {self._store.where}: {error}") from None
        self._store_open = True

    # --- hosted servers -----------------------------------------------------------------------

    def _bind(self, backend: BackendConfig) -> socket.socket:
        assert backend.port is not None
        return bind_socket(backend.host or self.config.balancer.host, backend.port)

    async def _start_hosted(self, backend: BackendConfig, sock: socket.socket) -> HostedBackend:
        host = backend.host or self.config.balancer.host
        port = sock.getsockname()[1]
        runner = await self._serve(backend.name, sock)
        return HostedBackend(backend, runner, dial_url(host, port), port, host)

    def backend_app(self, name: str) -> web.Application:
        """A hosted backend's app (served, or read for its routes)."""
        return make_backend_app(name, store=self._store, tracker=self.tracker, api=self.config.api, logger=self.logger)

    async def _serve(self, name: str, sock: socket.socket) -> web.AppRunner:
        return await serve(self.backend_app(name), sock, shutdown_timeout=self.config.balancer.shutdown_grace)

    def _attached(self) -> tuple[Pools, Balancer]:
        assert self.pool is not None and self._balancer is not None, "the system has not started"
        return self.pool, self._balancer

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

    # --- hot reload ---------------------------------------------------------------------------

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
                check_role(edited, self.role, source=str(self.config_path))
                plan = plan_reload(self.config, edited, source=str(self.config_path))
                missing = missing_read_token(edited)
                if missing is not None:
                    raise ConfigError(f"{self.config_path}: {missing}; the edit was not applied")
                certificates = await asyncio.to_thread(self._new_certificates, edited)
                if certificates:
                    replaced = tuple(f"[{name}] certificate replaced" for name in certificates)
                    plan = dataclasses.replace(plan, settings=plan.settings + replaced)
                started = await self._prepare(plan)
            except ConfigError as error:
                self.config_error = str(error)
                self.logger.error("config reload rejected", extra={FIELDS: {"origin": origin, "error": str(error)}})
                raise
            self._apply(plan, started)
            for name, new in certificates.items():
                self.certificates[name].use(new)
        self.config_error = None
        changes = "; ".join(plan.changes()) or "none"
        self.logger.info("config reloaded", extra={FIELDS: {"origin": origin, "file": str(self.config_path), "changes": changes}})
        return plan

    async def reload_quietly(self, origin: str) -> None:
        """`reload`, for callers that only start it (the file watcher, a signal)."""
        try:
            await self.reload(origin)
        except ConfigError:
            pass  # logged and shown in /status by reload()

    def request_reload(self, origin: str) -> None:
        """Reload in the background (SIGHUP)."""
        self._spawn(self.reload_quietly(origin))

    def _new_certificates(self, edited: Config) -> dict[str, NewCertificate]:
        """The TLS listeners' certificates whose files changed, loaded and checked (reads files:
        called in a thread). ConfigError names the key of one that does not load."""
        source = str(self.config_path)
        changed: dict[str, NewCertificate] = {}
        for name, certificate in self.certificates.items():
            new = certificate.prepare(getattr(edited, name), source=source)
            if new is not None:
                changed[name] = new
        return changed

    async def _prepare(self, plan: ReloadPlan) -> dict[str, HostedBackend]:
        """Open and serve the ports the edit needs before anything is swapped: a busy port refuses
        the whole edit with nothing changed. The new servers are not in the pool yet."""
        wanted = [b for b in plan.added if b.hosted] + [e.new for e in plan.edited if e.moved and e.new.hosted]
        if wanted:
            try:
                await self.open_store()
            except StartupError as error:
                key = "url" if self.config.database.postgres else "path"
                raise ConfigError(f"{self.config_path}: [database] {key}: {error}; the edit was not applied") from None
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
        pool, balancer = self._attached()
        old, new = self.config, plan.config
        current = {b.name: b for b in pool.backends}
        edits: dict[str, BackendEdit] = {e.name: e for e in plan.edited}
        members: list[tuple[Backend, str]] = []
        moved_from: list[str] = []  # the old addresses of moved backends
        for cfg in new.backends:
            backend = current.get(cfg.name)
            edit = edits.get(cfg.name)
            if backend is None:
                backend = new_backend(cfg, self._url_of(cfg, started))
            else:
                # Kept: same object, so health state, counters and history carry over (to another pool too).
                owner = pool.pool_of(backend)
                owner.configure(backend, cfg)
                if edit is not None and edit.moved:
                    previous = self.hosted.pop(cfg.name, None)
                    if previous is not None and previous.runner is not None:
                        self._close_soon(previous.runner)  # in-flight requests to the old port finish
                    moved_from.append(backend.url)
                    owner.move(backend, self._url_of(cfg, started), hosted=cfg.hosted)
            if cfg.name in started:
                self.hosted[cfg.name] = started[cfg.name]
            elif cfg.hosted:
                self.hosted[cfg.name].config = cfg
            members.append((backend, cfg.pool))

        removed = [current[name] for name in plan.removed]
        pool.assign(new.pools, members, routes=RouteTable.from_config(new.routes), removed=removed)
        for url in moved_from:
            if self._unused(url):
                balancer.retire_upstream(url)  # closed as its connections come idle
        if any(new.pools[name].health != old.pools.get(name, new.pools[name]).health for name in new.pools):
            balancer.wake_checks()  # the next round follows the new interval, not the old one
        if new.errors.recent != old.errors.recent:
            self.tracker.recent = new.errors.recent
        if new.log.level != old.log.level:
            self.logger.setLevel(new.log.level)
        balancer.apply_config(new)
        self.config = new

        for backend in removed:
            name = backend.name
            hosted = self.hosted.pop(name, None)
            runner = hosted.runner if hosted is not None else None
            if runner is not None:
                assert hosted is not None
                self._draining_runners[runner] = hosted
            self._spawn(self._retire(backend, runner))
        if plan.added or any(e.moved for e in plan.edited):
            balancer.wake_checks()

    def _unused(self, url: str) -> bool:
        """No backend, serving or draining, has this address."""
        pool, _ = self._attached()
        return all(other.url != url for other in (*pool.backends, *pool.retiring))

    @staticmethod
    def _url_of(cfg: BackendConfig, started: dict[str, HostedBackend]) -> str:
        if cfg.hosted:
            return started[cfg.name].url
        assert cfg.url is not None
        return cfg.url.rstrip("/")

    async def _retire(self, backend: Backend, runner: web.AppRunner | None) -> None:
        """A removed backend: no new requests; in-flight ones finish (up to drain_timeout),
        then its server, if hosted here, stops listening."""
        pool, balancer = self._attached()
        timeout = self.config.balancer.drain_timeout
        if not await pool.pool_of(backend).wait_drained(backend, timeout):
            fields = {"backend": backend.name, "active_requests": backend.active_requests, "timeout": timeout}
            self.logger.warning("backend drain timed out", extra={FIELDS: fields})
        if runner is not None:
            await asyncio.shield(self._close_soon(runner))
            pool.pool_of(backend).set_listening(backend, False)
        pool.forget(backend)
        if self._unused(backend.url):
            await balancer.forget_upstream(backend.url)  # drained: no request of its own is left on them
        self.logger.info("backend removed", extra={FIELDS: {"backend": backend.name}})
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

    # --- admin actions ------------------------------------------------------------------------

    def set_admin_state(self, backend: Backend, state: str) -> bool:
        """enable / disable / drain one backend; False when it already was in that state.
        The pool marks a drained backend when its last request ends."""
        pool, balancer = self._attached()
        changed = pool.pool_of(backend).set_admin_state(backend, state)
        if changed:
            balancer.wake_checks()
        return changed

    async def stop_backend(self, name: str) -> bool:
        """Close a hosted backend's listening socket (in-flight requests finish); False if already closed."""
        pool, balancer = self._attached()
        async with self._changes:
            hosted = self.hosted[name]
            if hosted.runner is None or self._stopping:
                return False
            runner, hosted.runner = hosted.runner, None
            backend = pool.get(name)
            if backend is not None:
                pool.pool_of(backend).set_listening(backend, False)
            self.logger.warning("backend stopped", extra={FIELDS: {"backend": name, "port": hosted.port, "by": "admin"}})
            await runner.cleanup()
        balancer.wake_checks()
        return True

    async def start_backend(self, name: str) -> bool:
        """Listen again on a stopped hosted backend's port; False if it is listening.
        ActionRefused when the port was taken meanwhile."""
        pool, balancer = self._attached()
        async with self._changes:
            hosted = self.hosted[name]
            if hosted.runner is not None or self._stopping:
                return False
            try:
                sock = await asyncio.to_thread(bind_socket, hosted.host, hosted.port)
            except StartupError as error:
                raise ActionRefused(str(error)) from None
            hosted.runner = await self._serve(name, sock)
            backend = pool.get(name)
            if backend is not None:
                pool.pool_of(backend).set_listening(backend, True)
            self.logger.info("backend started", extra={FIELDS: {"backend": name, "port": hosted.port, "by": "admin"}})
        balancer.wake_checks()
        return True
