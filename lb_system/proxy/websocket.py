"""The WebSocket tunnel: recognising an upgrade, and moving raw bytes both ways after the
backend's 101 until both directions ended, as a TCP proxy does: a side that half-closes (sends
its FIN) still gets what the other side sends, and its FIN is passed on.

Why raw bytes and not messages: the backend's side is the upstream transport's own tunnel
connection (outside the HTTP pool, capped by `max_tunnels_per_backend`), and the client's side is
taken over after the 101 the way aiohttp's own WebSocketResponse takes it (`set_parser`), so
nothing is re-framed: subprotocols, extensions (permessage-deflate), pings, close codes and
message sizes are the two ends' business, at the cost of a copy per read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from lb_system.upstream import Tunnel, UpstreamError


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in request.headers.get("Connection", "").lower()
    )


class ClientBytes:
    """Sits in aiohttp's payload-parser slot of the upgraded client connection: every byte the client
    sends goes to the backend; reading from the client pauses while the backend is slow to take them.
    `ended` is set when the client's connection is gone, `sent_all` when it half-closed."""

    def __init__(self, protocol: RequestHandler, tunnel: Tunnel, ended: asyncio.Future[None]) -> None:
        self._protocol, self._tunnel, self._ended = protocol, tunnel, ended
        self._drain: asyncio.Task[None] | None = None
        self.sent_all: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def half_close(self) -> bool:
        """The client sent its FIN: the backend gets one after the bytes before it. True keeps the
        client's connection open for what the backend still sends (ClientConnection.eof_received)."""
        if not self.sent_all.done():
            self.sent_all.set_result(None)
        self._tunnel.write_eof()  # the transport sends it once its buffer is out, whatever waits on a drain
        return not self._tunnel.closed

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        try:
            self._tunnel.write(data)
        except UpstreamError:  # the backend's side is gone: the tunnel ends
            self.feed_eof()
            return False, b""
        if self._tunnel.writing_paused and self._drain is None:
            self._protocol.pause_reading()
            self._drain = asyncio.get_running_loop().create_task(self._drained())
        return False, b""

    def feed_eof(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)

    async def _drained(self) -> None:
        await self._tunnel.drain()
        self._drain = None
        self._protocol.resume_reading()

    def stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()


async def tunnel_both_ways(
    request: web.Request, status: int, reason: str, headers: CIMultiDict[str], tunnel: Tunnel
) -> web.StreamResponse:
    """Send the backend's 101 to the client, then move bytes both ways until either side closes."""
    client = web.StreamResponse(status=status, reason=reason, headers=headers)
    client.force_close()  # after a tunnel the connection carries no more HTTP
    try:
        await client.prepare(request)
    except BaseException:
        tunnel.close()
        raise
    protocol = request.protocol
    client_ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    upward = ClientBytes(protocol, tunnel, client_ended)
    # aiohttp feeds an accepted upgrade's bytes (those already received first) to this slot; its own
    # WebSocketResponse uses it the same way. Typed for aiohttp's WebSocketReader, duck-typed here.
    protocol.set_parser(upward)  # type: ignore[arg-type]

    async def downward() -> bool:
        """The backend's bytes to the client; True when it half-closed and the client was told."""
        while data := await tunnel.read():
            await client.write(data)
        transport = request.transport
        if tunnel.closed or transport is None or transport.is_closing() or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    down = asyncio.ensure_future(downward())
    try:
        either: list[asyncio.Future[Any]] = [client_ended, down]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not client_ended.done() and not down.cancelled() and down.exception() is None and down.result():
            # The backend is done sending; the client may not be: until it is, or it leaves.
            await asyncio.wait([client_ended, upward.sent_all], return_when=asyncio.FIRST_COMPLETED)
    finally:
        upward.stop()
        tunnel.close()
        if not down.done():
            down.cancel()
        await asyncio.gather(down, return_exceptions=True)
    return client
