"""The WebSocket tunnel: recognising an upgrade, the tunnels' own upstream connections and their
cap, and pumping messages both ways until either side closes.

Why messages and not raw bytes after the 101: aiohttp's server hands an upgraded connection only
to its own WebSocketResponse; taking the socket over means its private parser hooks and going
around the client-side limits' protocol, which would break with any aiohttp release. Pumping
messages between two well-kept WebSocket ends keeps each side's close codes, pings and size limits
correct. The upstream end runs on a client session of its own, never the proxied requests'
connections, so open tunnels cannot starve a backend's HTTP traffic.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from lb_system.config import ProxyConfig

# The client's handshake headers are the client's; aiohttp makes fresh ones towards the backend.
WEBSOCKET_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol")


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in request.headers.get("Connection", "").lower()
    )


class Tunnels:
    """The upstream side of WebSocket tunnels: a client session whose connections are the tunnels'
    alone (no cap there), and a count per backend held under `max_tunnels_per_backend`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._open: dict[str, int] = {}

    def session(self, proxy: ProxyConfig) -> aiohttp.ClientSession:
        """The tunnels' session, made on first use (inside the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),  # the count below is the cap
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=proxy.connect_timeout),
            )
        return self._session

    def take(self, backend: str, cap: int) -> bool:
        """Count one more tunnel to `backend`; False (nothing counted) when it already has `cap`."""
        count = self._open.get(backend, 0)
        if count >= cap:
            return False
        self._open[backend] = count + 1
        return True

    def give_back(self, backend: str) -> None:
        count = self._open[backend] - 1
        if count:
            self._open[backend] = count
        else:
            del self._open[backend]

    def open_to(self, backend: str) -> int:
        """Tunnels open to `backend` now."""
        return self._open.get(backend, 0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def pump_both_ways(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    async def pump(source: WebSocket, sink: WebSocket) -> None:
        async for message in source:
            if message.type is aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            else:
                break
        await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)

    tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
