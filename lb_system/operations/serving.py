"""Serving sockets: binding a port so failures name it, and serving an aiohttp app on a bound socket."""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from aiohttp import web

_ADDRESS_IN_USE = {errno.EADDRINUSE, 10048}  # 10048: WSAEADDRINUSE on Windows
# Connections the kernel may hold for accept(). aiohttp's 128 overflows when a few hundred
# clients connect at once to a busy loop: the dropped handshakes cost their first request
# a TCP retransmit (200 ms to over 1 s). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class StartupError(Exception):
    """The system cannot start (a port in use, a database that cannot open)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is reported by number and port 0 gets a real one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise StartupError(f"cannot resolve host {host!r}: {error}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":  # on Windows it would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def dial_url(host: str, port: int) -> str:
    """The URL that reaches a server bound on `host`:`port` (0.0.0.0 is not an address to dial on Windows)."""
    host = _dial_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    app: web.Application,
    sock: socket.socket,
    *,
    shutdown_timeout: float,
    runner_class: type[web.AppRunner] = web.AppRunner,
    **runner_options: Any,
) -> web.AppRunner:
    """Serve `app` on the bound `sock`; `shutdown_timeout` is how long cleanup() lets in-flight requests finish."""
    runner = runner_class(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout, **runner_options)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()  # it listens again
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner
