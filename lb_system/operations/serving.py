"""Serving sockets: binding a port so failures name it, and serving an aiohttp app on a bound socket."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from lb_system.observability.log import FIELDS

_ADDRESS_IN_USE = {errno.EADDRINUSE, 10048}  # 10048: WSAEADDRINUSE on Windows
# Connections the kernel may hold for accept(). aiohttp's 128 overflows when a few hundred
# clients connect at once to a busy loop: the dropped handshakes cost their first request
# a TCP retransmit (200 ms to over 1 s). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


# A client that gave up between its handshake and our accept(): the next one may be waiting.
_CLIENT_GONE = {errno.ECONNABORTED, getattr(errno, "EPROTO", errno.ECONNABORTED)}
# Anything else (out of descriptors or memory, above all) fails again at once, and the socket
# stays readable: accepting pauses this long instead of spinning the loop.
ACCEPT_PAUSE_S = 1.0
_log = logging.getLogger("lb_system.serving")


class StartupError(Exception):
    """The system cannot start (a port in use, a database that cannot open)."""


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket, so a busy port is reported by number and port 0 gets a real one.
    With `reuse_port`, other processes that set it too may listen on the same port (SO_REUSEPORT:
    the kernel spreads new connections across them); config validation refuses it where absent."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise StartupError(f"cannot resolve host {host!r}: {error}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":  # on Windows it would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno in _ADDRESS_IN_USE:
            raise StartupError(f"port {port} on {host} is already in use") from None
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _dial_host(host: str) -> str:
    """Where to connect to reach a server bound on `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def dial_url(host: str, port: int, scheme: str = "http") -> str:
    """The URL that reaches a server bound on `host`:`port` (0.0.0.0 is not an address to dial on Windows)."""
    host = _dial_host(host)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# (client address, the error) of a TLS handshake that failed: an ssl.SSLError, or ConnectionAbortedError past its time.
HandshakeFailed = Callable[[str, OSError], None]


class BurstAcceptor:
    """Accepts every connection waiting on a listening socket at each wake-up (up to the
    backlog), as asyncio's own loops do. uvloop accepts about one per loop iteration: when a
    few hundred clients connected at once to a busy loop, the last waited in the kernel's accept
    queue for up to 0.8 s (benchmarks/run.py's 256-connection p99). What aiohttp's sites need of
    a server: `sockets` and `close()`.

    With an SSLContext it makes each connection's TLS handshake itself (within
    `handshake_timeout`), on every loop, so a failed one is reported to `on_handshake_failed`:
    asyncio's and uvloop's servers only drop it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        limit: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        on_handshake_failed: HandshakeFailed | None = None,
    ) -> None:
        self._loop, self._factory, self._sock, self._limit = loop, protocol_factory, sock, limit
        self._tls: dict[str, Any] = {"ssl": ssl_context, "ssl_handshake_timeout": handshake_timeout} if ssl_context else {}
        self._on_handshake_failed = on_handshake_failed
        self.sockets = (sock,)
        self._starting: set[asyncio.Task[Any]] = set()
        self._paused: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self._limit):
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _CLIENT_GONE:
                    continue
                fields = {"port": self._sock.getsockname()[1], "reason": error.strerror, "seconds": ACCEPT_PAUSE_S}
                _log.warning("accept paused", extra={FIELDS: fields})
                self._loop.remove_reader(self._sock.fileno())
                self._paused = self._loop.call_later(ACCEPT_PAUSE_S, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn, address))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket, address: Any) -> None:
        try:
            # With TLS this returns once the handshake is done (the loop's SSL protocol waits for it).
            await self._loop.connect_accepted_socket(self._factory, conn, **self._tls)
        except (ssl.SSLError, ConnectionAbortedError) as error:
            conn.close()
            # A reset or an EOF before any hello is a client that left (or a TCP probe), not a failed handshake.
            if self._tls and self._on_handshake_failed is not None and not isinstance(error, ssl.SSLEOFError):
                client = address[0] if isinstance(address, tuple) else str(address)
                self._on_handshake_failed(client, error)
        except OSError:  # the client left before its transport was made
            conn.close()
        except Exception:
            conn.close()
            _log.exception("accepted connection failed")

    def _resume(self) -> None:
        self._paused = None
        if self._sock.fileno() != -1:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket; accepted connections live on."""
        if self._paused is not None:
            self._paused.cancel()
        if self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


class _Site(web.SockSite):
    """aiohttp's SockSite, accepting with a BurstAcceptor on uvloop, and for TLS on any loop that
    has add_reader (asyncio's loops already accept up to the backlog at a time; Windows' proactor
    has no add_reader: there TLS is asyncio's own, and a failed handshake goes unreported)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        on_handshake_failed: HandshakeFailed | None = None,
    ) -> None:
        super().__init__(runner, sock, backlog=LISTEN_BACKLOG, ssl_context=ssl_context)
        self._handshake_timeout = handshake_timeout
        self._on_handshake_failed = on_handshake_failed

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        uvloop = type(loop).__module__.startswith("uvloop")
        if not (uvloop or (self._ssl_context is not None and isinstance(loop, asyncio.SelectorEventLoop))):
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = BurstAcceptor(  # type: ignore[assignment]
            loop,
            server,
            self._sock,
            self._backlog,
            ssl_context=self._ssl_context,
            handshake_timeout=self._handshake_timeout,
            on_handshake_failed=self._on_handshake_failed,
        )


async def serve(
    app: web.Application,
    sock: socket.socket,
    *,
    shutdown_timeout: float,
    runner_class: type[web.AppRunner] = web.AppRunner,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
    on_handshake_failed: HandshakeFailed | None = None,
    **runner_options: Any,
) -> web.AppRunner:
    """Serve `app` on the bound `sock`; `shutdown_timeout` is how long cleanup() lets in-flight requests finish.
    With `ssl_context` it is HTTPS: each handshake has `handshake_timeout` seconds, and a failed one
    goes to `on_handshake_failed`."""
    runner = runner_class(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout, **runner_options)
    try:
        await runner.setup()
        site = _Site(
            runner, sock, ssl_context=ssl_context, handshake_timeout=handshake_timeout, on_handshake_failed=on_handshake_failed
        )
        await site.start()  # it listens again
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


async def serve_also(runner: web.AppRunner, sock: socket.socket) -> None:
    """Serve the runner's app on one more bound socket (runner.cleanup() stops it with the others)."""
    try:
        await _Site(runner, sock).start()
    except BaseException:
        sock.close()
        raise
