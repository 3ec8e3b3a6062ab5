"""The WebSocket tunnel: recognising an upgrade, and pumping messages both ways until either side closes."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

# The client's handshake headers are the client's; aiohttp makes fresh ones towards the backend.
WEBSOCKET_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol")


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in request.headers.get("Connection", "").lower()
    )


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
