"""Serving a bound socket: a burst of clients is accepted at once, on uvloop too."""

from __future__ import annotations

import asyncio
import socket
import sys

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


SERVER_OUT_OF_DESCRIPTORS = """
import asyncio, logging, os, resource, sys
import uvloop
from aiohttp import web
from lb_system.operations.serving import bind_socket, serve

async def main():
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="ok"))
    sock = bind_socket("127.0.0.1", 0)
    await serve(app, sock, shutdown_timeout=1.0)
    # A few descriptors to spare: the clients of the test take them, and accept() then fails.
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 6, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(sock.getsockname()[1], flush=True)
    await asyncio.sleep(60)

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
uvloop.run(main())
"""


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
@pytest.mark.skipif(uvloop is None or not sys.platform.startswith("linux"), reason="uvloop and /proc are needed")
async def test_out_of_descriptors_pauses_accepting_and_serves_again_once_some_close() -> None:
    # accept() failing with EMFILE leaves the socket readable: without a pause the loop would spin.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER_OUT_OF_DESCRIPTORS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None and server.stderr is not None
    clients: list[socket.socket] = []
    try:
        port = int(await asyncio.wait_for(server.stdout.readline(), 10))
        for _ in range(20):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        line = await asyncio.wait_for(server.stderr.readline(), 10)
        assert line.decode().startswith("WARNING accept paused")
        for client in clients:
            client.close()
        clients.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert server.returncode is None
    finally:
        for client in clients:
            client.close()
        if server.returncode is None:
            server.kill()
        await server.wait()
