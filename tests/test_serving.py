"""Serving a bound socket: a burst of clients is accepted at once, on uvloop too."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

try:
    import uvloop
except ImportError:  # Windows: plain asyncio only
    uvloop = None  # type: ignore[assignment]

from lb_system.operations.serving import bind_socket, serve

BURST = 200


async def _burst() -> tuple[int, int]:
    """(connections accepted after a few loop iterations, connections in the burst)."""
    app = web.Application()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    runner = await serve(app, sock, shutdown_timeout=1.0)
    clients: list[socket.socket] = []
    try:
        for _ in range(BURST):  # the kernel completes each handshake; they wait in the accept queue
            client = socket.create_connection(("127.0.0.1", port))
            clients.append(client)
        server = runner.server
        assert server is not None
        for _ in range(10):  # a few iterations of the loop, never a wait on the clock
            await asyncio.sleep(0)
        return len(server.connections), BURST
    finally:
        for client in clients:
            client.close()
        await runner.cleanup()


@pytest.mark.skipif(uvloop is None, reason="uvloop is not installed here")
def test_a_burst_of_clients_is_accepted_at_the_next_wake_up_on_uvloop() -> None:
    # uvloop's own server accepts about one connection per loop iteration: under load the last
    # of 256 new clients waited 0.8 s before its first request was read.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        accepted, burst = runner.run(_burst())
    assert accepted == burst


async def test_a_burst_of_clients_is_accepted_at_the_next_wake_up() -> None:
    accepted, burst = await _burst()
    assert accepted == burst
