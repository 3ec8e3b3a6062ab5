"""The whole system in one event loop: start and stop the task store, the hosted backends and
the balancer, in order. Changes while it runs belong to `Membership`."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from lb_system.balancing.pools import Pools
from lb_system.config import DEFAULT_CONFIG_PATH, Config, ConfigError, check_role, missing_read_token
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.log import FIELDS, LOGGER_NAME
from lb_system.observability.status import loop_name
from lb_system.operations.config_watch import ConfigWatcher
from lb_system.operations.membership import HostedBackend, Membership
from lb_system.operations.serving import StartupError, bind_socket, dial_url, serve, serve_also
from lb_system.operations.tls import ListenerCertificate
from lb_system.problems import RouteGroups
from lb_system.proxy.admin import admin_api_on
from lb_system.proxy.balancer import Balancer, make_balancer_app
from lb_system.proxy.client_limits import ClientLimitsRunner
from lb_system.proxy.https_redirect import make_redirect_app
from lb_system.tasks.openapi import task_api_document
from lb_system.tasks.store import make_task_store


class System:
    """Starts and stops everything in order; `async with System(config) as system:`.

    Given `config_path`, it watches that file and applies saved edits live (see `Membership.reload`).
    """

    def __init__(
        self,
        config: Config,
        *,
        logger: logging.Logger | None = None,
        config_path: str | Path | None = None,
        watch_interval: float = 0.5,
        role: str = "all",
        instance_index: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_role(config, role, source=str(config_path or DEFAULT_CONFIG_PATH))
        self.role = role
        # The pool's clock (health timestamps, ejections, slow start): a test moves a fake one.
        self.clock = clock
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.tracker = ErrorTracker(config.errors.recent)
        self.store = make_task_store(config.database, self.logger)
        self.config_path = Path(config_path) if config_path is not None else None
        self.membership = Membership(
            config, store=self.store, tracker=self.tracker, logger=self.logger, config_path=self.config_path, role=role
        )
        self.balancer: Balancer | None = None
        self.balancer_runner: web.AppRunner | None = None
        self.balancer_url = ""
        # This process's own port ([balancer] instance_port + instance_index), None without one.
        self.instance_index = instance_index
        self.instance_url: str | None = None
        # The control listener ([control] port) and the HTTP-to-HTTPS one ([balancer] redirect_http_port), when set.
        self.control_runner: web.AppRunner | None = None
        self.control_url = ""
        self.redirect_runner: web.AppRunner | None = None
        self.redirect_url = ""
        self.watch_interval = watch_interval
        self._watcher: ConfigWatcher | None = None
        self._started = False  # "started" was logged: stop() logs stopping and stopped

    @property
    def config(self) -> Config:
        """The running config (a reload replaces it)."""
        return self.membership.config

    @property
    def config_error(self) -> str | None:
        """The last rejected edit of the config file; None when the file is what runs."""
        return self.membership.config_error

    @property
    def pool(self) -> Pools | None:
        """Every pool of backends, the routes to them, and the whole-system view of their backends."""
        return self.membership.pool

    @property
    def hosted(self) -> dict[str, HostedBackend]:
        return self.membership.hosted

    @property
    def serves_backends(self) -> bool:
        """This process hosts the task-API backends (and opens the task store)."""
        return self.role in ("all", "backends")

    @property
    def serves_balancer(self) -> bool:
        return self.role in ("all", "balancer")

    def request_reload(self, origin: str) -> None:
        """Reload the config file in the background (SIGHUP)."""
        if not self.serves_balancer:
            # Reload edits the balancer's pool; a backends-only process has none. Say so, change nothing.
            self.logger.warning("config reload needs a restart with --role backends", extra={FIELDS: {"origin": origin}})
            return
        self.membership.request_reload(origin)

    async def __aenter__(self) -> System:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def dashboard_url(self) -> str:
        """The live dashboard: the root page of the control listener, or of the balancer without one."""
        return (self.control_url or self.balancer_url) + "/"

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        # No hosted backend, no task API: no database file either (until a reload hosts one).
        if self.serves_backends and any(b.hosted for b in config.backends):
            await self.membership.open_store()
        if not self.serves_balancer:
            urls = await self.membership.start_servers()
            self._log_started({}, urls)
            return
        missing = missing_read_token(config)
        if missing is not None:
            raise StartupError(missing)
        source = str(self.config_path or "config")
        try:
            certificates = {
                name: ListenerCertificate(name, getattr(config, name), source=source)
                for name in ("balancer", "control")
                if getattr(config, name).tls
            }
        except ConfigError as error:
            raise StartupError(str(error)) from None
        self.membership.certificates = certificates
        # Bind every port before serving anything: a busy port stops start-up with nothing half-open.
        listeners: dict[str, tuple[str, int]] = {"balancer": (config.balancer.host, config.balancer.port)}
        if config.control.port is not None:
            listeners["control"] = (config.control.host, config.control.port)
        if config.balancer.redirect_http_port is not None:
            listeners["redirect"] = (config.balancer.host, config.balancer.redirect_http_port)
        sockets: dict[str, socket.socket] = {}
        try:
            for name, (host, port) in listeners.items():
                sockets[name] = bind_socket(host, port, reuse_port=config.balancer.reuse_port)
            urls = await self.membership.start_servers()
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise

        pools = Pools.from_config(config, urls, logger=self.logger, clock=self.clock)
        self.balancer = balancer = make_balancer_app(
            config,
            pools=pools,
            tracker=self.tracker,
            logger=self.logger,
            control=self.membership,
            forwarded_api=task_api_document(debug_endpoints=config.api.debug_endpoints),
            hosted_routes=RouteGroups(self.membership.backend_app("routes")),
        )
        self.membership.attach(pools, balancer)
        ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}

        def tls_options(name: str) -> dict[str, Any]:
            certificate = certificates.get(name)
            if certificate is None:
                return {}
            return {
                "ssl_context": certificate.server_context,
                "handshake_timeout": config.proxy.header_timeout,
                "on_handshake_failed": balancer.handshake_failed,
            }

        for name in list(sockets):
            sock = sockets.pop(name)
            try:
                runner = await self._serve_listener(name, sock, ports["balancer"], tls_options(name))
            except BaseException:
                for left in sockets.values():
                    left.close()
                raise
            host, _ = listeners[name]
            url = dial_url(host, ports[name], "https" if name in certificates else "http")
            if name == "balancer":
                self.balancer_runner, self.balancer_url = runner, url
            elif name == "control":
                self.control_runner, self.control_url = runner, url
            else:
                self.redirect_runner, self.redirect_url = runner, url
        if config.balancer.instance_port is not None:
            # Where Prometheus scrapes this process alone: its own endpoints, wherever they are served.
            own_runner = self.control_runner or self.balancer_runner
            assert own_runner is not None
            await self._serve_instance_port(own_runner, config)
        started: dict[str, object] = {"balancer": self.balancer_url}
        if self.control_url:
            started["control"] = self.control_url
        if self.redirect_url:
            started["redirect"] = self.redirect_url
        started.update(
            {
                "dashboard": self.dashboard_url,
                "admin": "on" if admin_api_on(config) else "off",
                "admin_token_env": config.admin.token_env,
            }
        )
        if self.instance_url is not None:
            started["instance"] = self.instance_url
        if config.control.read_token_env is not None:
            started["read_token_env"] = config.control.read_token_env
        self._log_started(started, urls)
        if self.config_path is not None:
            self._watcher = ConfigWatcher(
                self.config_path,
                lambda: self.membership.reload_quietly("file"),
                interval=self.watch_interval,
                logger=self.logger,
            )
            self._watcher.start()

    def _log_started(self, started: dict[str, object], urls: dict[str, str]) -> None:
        if self.config.backends:
            started["backends"] = ",".join(f"{b.name}@{urls[b.name]}" for b in self.config.backends)
        if self.hosted:
            started["database"] = self.store.where  # the URL without its password
        started["role"] = self.role
        started["loop"] = loop_name()  # "uvloop", or "asyncio" where uvloop is not installed (Windows)
        self.logger.info("started", extra={FIELDS: started})
        self._started = True

    async def _serve_instance_port(self, runner: web.AppRunner, config: Config) -> None:
        """The balancer on this process's own port too, where Prometheus scrapes this instance alone."""
        base = config.balancer.instance_port
        sock = bind_socket(config.balancer.host, base + self.instance_index if base else 0)
        await serve_also(runner, sock)
        self.instance_url = dial_url(config.balancer.host, sock.getsockname()[1])

    async def _serve_listener(self, name: str, sock: socket.socket, https_port: int, tls: dict[str, Any]) -> web.AppRunner:
        """Serve one of the balancer's listeners: traffic, control, or the redirect to HTTPS."""
        config, balancer = self.config, self.balancer
        assert balancer is not None
        grace = config.balancer.shutdown_grace
        if name == "redirect":
            return await serve(make_redirect_app(https_port), sock, shutdown_timeout=grace)
        app = balancer.app if name == "balancer" else balancer.control_app
        assert app is not None
        return await serve(
            app,
            sock,
            shutdown_timeout=grace,
            runner_class=ClientLimitsRunner,
            keepalive_timeout=config.proxy.idle_timeout,
            **tls,
        )

    # --- shutdown --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting on every port at once, let in-flight requests finish (up to
        [balancer] shutdown_grace), then close the client pool and the database. Logs
        `stopping`, and `stopped` once everything is closed."""
        if self._started:
            grace = self.config.balancer.shutdown_grace
            self.logger.info("stopping", extra={FIELDS: {"shutdown_grace": grace}})
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            await watcher.stop()
        backend_runners = await self.membership.stop_changes()
        balancer_runner, self.balancer_runner = self.balancer_runner, None
        own_runners = [self.control_runner, self.redirect_runner]
        self.control_runner = self.redirect_runner = None
        for runner in [balancer_runner, *own_runners, *backend_runners]:
            if runner is not None:
                for site in list(runner.sites):
                    await site.stop()  # closes the listening socket; no await inside in practice
        # The balancer first: its in-flight requests still need the backends' open connections.
        await asyncio.gather(*(runner.cleanup() for runner in own_runners if runner is not None))
        if balancer_runner is not None:
            await balancer_runner.cleanup()
        await asyncio.gather(*(runner.cleanup() for runner in backend_runners), self.membership.wait_closed())
        await self.store.close()  # closing one never opened is nothing
        if self._started:
            self._started = False
            self.logger.info("stopped", extra={FIELDS: {"balancer": self.balancer_url}})
