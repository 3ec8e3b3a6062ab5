"""Outside backends over HTTP (aiohttp servers the system does not host), one class for every
test: healthy or sick, echoing what they got, and misbehaving on the paths that ask for it.
Raw-socket misbehaviour (resets, half answers, a full backlog) is in `support.misbehaving`."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MiB = 1024 * 1024
GZIPPED = gzip.compress(b"hello, compressed world " * 100)


class FakeBackend:
    """An outside backend a test starts, stops and restarts on the same port, and makes sick.

    `/health` answers 200, or 503 while `healthy` is false. Any other path counts a hit and
    echoes the request, except: `/code/<n>` answers status n; `/hold` and `/slow` wait until the
    test sets `release` (at most `?s=` seconds, default 30); `/flaky` is 503 at once on the
    backend named "first" and held elsewhere; `/hang` waits for `release` alone; `/drop` reads
    the request and closes without an answer; `/truncated`, `/trickle`, `/stall`, `/cut` (chunked)
    and `/short` send part of a body; `/download?bytes=n`,
    `/upload`, `/gzip`, `/nocontent`, `/notmodified`, `/hop` and the `/ws` WebSocket serve the
    proxy's byte-moving tests. With `misbehaves=False` every path but `/health` just echoes
    (the good backend beside a bad one).
    """

    def __init__(self, name: str, *, misbehaves: bool = True) -> None:
        self.name = name
        self.misbehaves = misbehaves
        self.healthy = True
        self.hits = 0  # requests other than /health
        self.active = 0  # requests being held (/hold, /slow, /flaky, /trickle)
        self.uploaded = 0
        self.seen_headers: list[dict[str, str]] = []
        self.peers: set[tuple[str, int]] = set()  # client addresses seen: one per connection
        self.release = asyncio.Event()
        self.server: TestServer | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = TestServer(self.make_app(), host="127.0.0.1", port=self.port or 0)
        await self.server.start_server()
        self.port = self.server.port

    async def stop(self) -> None:
        self.release.set()  # held requests finish instead of holding the server's close
        if self.server is not None:
            await self.server.close()
            self.server = None

    def make_app(self) -> web.Application:
        @web.middleware
        async def count(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path != "/health":
                self.hits += 1
                if request.transport is not None:
                    self.peers.add(request.transport.get_extra_info("peername")[:2])
                if not self.misbehaves:
                    return await self._echo(request)
            return await handler(request)

        app = web.Application(middlewares=[count], client_max_size=1024**3)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/code/{code}", self._status)
        app.router.add_get("/hold", self._hold)
        app.router.add_get("/slow", self._hold)
        app.router.add_get("/flaky", self._flaky)
        app.router.add_get("/download", self._download)
        app.router.add_get("/trickle", self._trickle)
        app.router.add_get("/stall", self._stall)
        app.router.add_get("/truncated", self._truncated)
        app.router.add_get("/hang", self._hang)
        app.router.add_get("/cut", self._cut)
        app.router.add_get("/short", self._short)
        app.router.add_route("*", "/drop", self._drop)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/gzip", self._gzipped)
        app.router.add_get("/nocontent", self._no_content)
        app.router.add_get("/notmodified", self._not_modified)
        app.router.add_get("/hop", self._hop_by_hop)
        app.router.add_get("/ws", self._websocket)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._echo)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        status = 200 if self.healthy else 503
        return web.json_response({"status": "ok" if self.healthy else "sick", "server": self.name}, status=status)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen_headers.append(dict(request.headers))
        return web.json_response(
            {
                "server": self.name,
                "method": request.method,
                "path": request.path_qs,
                "body_bytes": len(body),
                "headers": dict(request.headers),
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"server": self.name}, status=int(request.match_info["code"]))

    async def _hold(self, request: web.Request) -> web.Response:
        self.active += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), float(request.query.get("s", "30")))
            return web.json_response({"server": self.name})
        finally:
            self.active -= 1

    async def _flaky(self, request: web.Request) -> web.Response:
        if self.name == "first":
            return web.json_response({"server": self.name}, status=503)
        return await self._hold(request)

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10 * MiB  # large: streamed, so bytes reach the client early
        await response.prepare(request)
        await response.write(b"p" * MiB)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _hang(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.json_response({"server": self.name})

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"c" * 4096)
        assert request.transport is not None
        request.transport.close()  # mid-body: no last chunk
        return response

    async def _short(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = MiB  # large: streamed through
        await response.prepare(request)
        await response.write(b"s" * 4096)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _drop(self, request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        """A large answer whose headers come at once and whose body drips until released."""
        self.active += 1
        try:
            response = web.StreamResponse()
            response.content_length = 10 * MiB
            await response.prepare(request)
            while not self.release.is_set():
                await response.write(b"t" * 1024)
                await asyncio.sleep(0.05)
            return response
        finally:
            self.active -= 1

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        """A large answer that sends its first MiB and then nothing until released."""
        response = web.StreamResponse()
        response.content_length = 10 * MiB
        await response.prepare(request)
        await response.write(b"s" * MiB)
        await self.release.wait()
        return response

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["bytes"])
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        block = b"x" * (256 * 1024)
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            total += len(chunk)
        self.uploaded = total
        return web.json_response({"received": total})

    async def _gzipped(self, request: web.Request) -> web.Response:
        return web.Response(body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def _no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Extra": "1"})

    async def _not_modified(self, request: web.Request) -> web.Response:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    async def _hop_by_hop(self, request: web.Request) -> web.StreamResponse:
        headers = {
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "leak",
            "Keep-Alive": "timeout=5",
            "X-End-To-End": "kept",
        }
        if not request.query.get("chunked"):
            return web.Response(text="ok", headers=headers)
        response = web.StreamResponse(headers=headers)  # chunked: streamed through the balancer
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"ok")
        await response.write_eof()
        return response

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws


@contextlib.asynccontextmanager
async def started_backends() -> AsyncIterator[Callable[..., Awaitable[FakeBackend]]]:
    """Start fake backends by name (keyword options go to FakeBackend); every one is stopped on the way out."""
    started: list[FakeBackend] = []

    async def start(name: str, **options: bool) -> FakeBackend:
        backend = FakeBackend(name, **options)
        await backend.start()
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in started:
            await backend.stop()
