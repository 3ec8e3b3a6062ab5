"""The whole system in one event loop: the task store, the hosted backends, the balancer."""

from __future__ import annotations

import errno
import logging
import socket
import sys
from dataclasses import dataclass

from aiohttp import web

from .backend_pool import BackendPool
from .balancer import make_balancer_app
from .config import BackendConfig, Config
from .error_tracker import ErrorTracker
from .keys import HEALTH_CHECKER
from .log import LOGGER_NAME
from .task_api import make_backend_app
from .task_store import TaskStore


_ADDRESS_IN_USE = {errno.EADDRINUSE, 10048}  # 10048: WSAEADDRINUSE on Windows


class StartupError(Exception):
    """The system cannot start (a port in use, a database that cannot open)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is reported by number and port 0 gets a real one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise StartupError(f"cannot resolve host {host!r}: {error}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":  # on Windows it would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as error:
        sock.close()
        if error.errno in _ADDRESS_IN_USE:
            raise StartupError(f"port {port} on {host} is already in use") from None
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _dial_host(host: str) -> str:
    """Where to connect to reach a server bound on `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url(host: str, port: int) -> str:
    host = _dial_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class HostedBackend:
    config: BackendConfig
    runner: web.AppRunner
    url: str
    port: int


class System:
    """Starts and stops everything in order; `async with System(config) as system:`."""

    def __init__(self, config: Config, *, logger: logging.Logger | None = None) -> None:
        self.config = config
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.tracker = ErrorTracker(config.errors.recent)
        self.store = TaskStore(config.database.path)
        self.hosted: dict[str, HostedBackend] = {}
        self.pool: BackendPool | None = None
        self.balancer_runner: web.AppRunner | None = None
        self.balancer_app: web.Application | None = None
        self.balancer_url = ""

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
        try:
            for backend in config.backends:
                if backend.hosted:
                    assert backend.port is not None
                    sockets[backend.name] = bind_socket(backend.host or config.balancer.host, backend.port)
        except BaseException:
            balancer_sock.close()
            for sock in sockets.values():
                sock.close()
            raise

        urls: dict[str, str] = {}
        for backend in config.backends:
            if backend.hosted:
                sock = sockets.pop(backend.name)
                host = backend.host or config.balancer.host
                port = sock.getsockname()[1]
                runner = await self._serve(self._make_backend(backend.name), sock)
                self.hosted[backend.name] = HostedBackend(backend, runner, _url(host, port), port)
                urls[backend.name] = _url(host, port)
            else:
                assert backend.url is not None
                urls[backend.name] = backend.url.rstrip("/")

        self.pool = BackendPool.from_config(
            config.backends, urls, health=config.health, strategy=config.balancer.strategy, logger=self.logger
        )
        self.balancer_app = make_balancer_app(config, pool=self.pool, tracker=self.tracker, logger=self.logger)
        port = balancer_sock.getsockname()[1]
        self.balancer_runner = await self._serve(
            self.balancer_app, balancer_sock, keepalive_timeout=config.proxy.idle_timeout
        )
        self.balancer_url = _url(config.balancer.host, port)
        self.logger.info(
            "started balancer=%s backends=%s",
            self.balancer_url,
            ",".join(f"{b.name}@{urls[b.name]}" for b in config.backends),
        )

    def _make_backend(self, name: str) -> web.Application:
        return make_backend_app(name, store=self.store, tracker=self.tracker, api=self.config.api, logger=self.logger)

    async def _serve(self, app: web.Application, sock: socket.socket, **runner_options: float) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_options)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        return runner

    @property
    def health_checker(self):  # noqa: ANN201 - HealthChecker, available once started
        assert self.balancer_app is not None
        return self.balancer_app[HEALTH_CHECKER]

    async def stop(self) -> None:
        """Balancer first (no new requests), then the backends, then the database."""
        if self.balancer_runner is not None:
            runner, self.balancer_runner = self.balancer_runner, None
            await runner.cleanup()
        for hosted in list(self.hosted.values()):
            await hosted.runner.cleanup()
        self.hosted.clear()
        await self.store.close()
