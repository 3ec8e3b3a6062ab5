"""The process under test: a System (hosted backends + balancer) and, in the same event loop,
the bare forwarder a user would write by hand in front of the same backends, the aiohttp floor,
the featureless forwarder on lb_system's own upstream transport, and the same with httptools
on the client side.

Usage: python benchmarks/server.py CONFIG [--bare-port 0] [--watch-stdin]

Logging is set up as `python run.py` sets it up (the access log at the config's level, to its
file). Seeds task 1, then prints one JSON line with the URLs and the loop in use, and serves
until SIGTERM/SIGINT, or with --watch-stdin until stdin closes (so it never outlives the benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
from pathlib import Path

import aiohttp
import httptools
from aiohttp import web
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb_system import System, load_config  # noqa: E402
from lb_system.cli.main import new_event_loop_factory, tune_gc  # noqa: E402
from lb_system.config import ProxyConfig  # noqa: E402
from lb_system.observability.log import configure_logging  # noqa: E402
from lb_system.upstream import Transport  # noqa: E402

SEED_TASK = {"title": "benchmark task", "description": "the task every benchmark request reads", "done": False}

BARE_SESSION = web.AppKey("bare_session", aiohttp.ClientSession)


def make_bare_forwarder(backend_urls: list[str]) -> web.Application:
    """The baseline: one ClientSession, round robin, read the body, return it."""
    urls = itertools.cycle(backend_urls)

    async def forward(request: web.Request) -> web.Response:
        session = request.app[BARE_SESSION]
        async with session.request(request.method, next(urls) + request.path_qs, data=await request.read()) as upstream:
            body = await upstream.read()
            return web.Response(body=body, status=upstream.status, content_type=upstream.content_type)

    async def session_ctx(app: web.Application):
        async with aiohttp.ClientSession() as session:
            app[BARE_SESSION] = session
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def make_floor_session(proxy: ProxyConfig) -> aiohttp.ClientSession:
    """aiohttp's client set up as a proxy's (the balancer's own, before it had a transport of its
    own): keep-alive pool capped per backend, nothing decoded, added or kept."""
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=proxy.max_connections_per_backend, keepalive_timeout=30.0, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=proxy.connect_timeout),
    )


def make_floor_forwarder(backend_urls: list[str], session: aiohttp.ClientSession) -> web.Server:
    """The floor: the least work aiohttp's client and server can do to forward a request (its
    low-level server, no router, no middleware, pre-parsed URLs, no features at all). Not a
    usable proxy: it shows what any proxy built on aiohttp's client and server costs at best."""
    bases = itertools.cycle([URL(url) for url in backend_urls])

    async def forward(request: web.BaseRequest) -> web.Response:
        target = next(bases).with_path(request.raw_path, encoded=True)
        async with session.request(request.method, target, headers=request.headers) as upstream:
            body = await upstream.read()
            return web.Response(body=body, status=upstream.status, content_type=upstream.content_type)

    return web.Server(forward, access_log=None)


def make_transport_forwarder(backend_urls: list[str], pool: Transport) -> web.Server:
    """The floor's shape on lb_system's own upstream transport (keep-alive pool, llhttp parser):
    aiohttp's low-level server in front, round robin, no features. The balancer's features are
    measured against this."""
    endpoints = itertools.cycle([pool.endpoint(url) for url in backend_urls])

    async def forward(request: web.BaseRequest) -> web.Response:
        body = await request.read() if request.body_exists else None
        upstream = await next(endpoints).request(request.method, request.raw_path, request.headers.items(), body)
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        content_type = upstream.header("Content-Type")
        return web.Response(body=data, status=upstream.status, headers={"Content-Type": content_type} if content_type else None)

    return web.Server(forward, access_log=None)


class HttptoolsFront(asyncio.Protocol):
    """The featureless forwarder with no aiohttp in the hop: httptools parses the client's
    requests, lb_system's transport carries them (the issue's "httptools on both sides" row).
    It measures what moving the balancer's client side off aiohttp's server could win; it keeps
    none of a proxy's duties (no pipelining, no limits, no headers policy)."""

    def __init__(self, endpoints: itertools.cycle) -> None:
        self.endpoints = endpoints
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        url, headers, self.url, self.headers = self.url.decode("latin-1"), self.headers, b"", []
        asyncio.get_running_loop().create_task(self.forward(method, url, headers))

    async def forward(self, method: str, url: str, headers: list[tuple[str, str]]) -> None:
        upstream = await next(self.endpoints).request(method, url, headers, None)
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        content_type = upstream.header("Content-Type", "application/octet-stream")
        head = f"HTTP/1.1 {upstream.status} {upstream.reason}\r\nContent-Type: {content_type}\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + data)


async def serve(config_path: str, bare_port: int, watch_stdin: bool) -> None:
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)

    async with System(config) as system:
        if await system.store.get(1) is None:
            await system.store.create(**SEED_TASK)
        tune_gc()  # as `python run.py` does once started
        bare_runner = web.AppRunner(make_bare_forwarder([h.url for h in system.hosted.values()]), access_log=None)
        await bare_runner.setup()
        bare_site = web.TCPSite(bare_runner, config.balancer.host, bare_port)
        await bare_site.start()
        floor_session = make_floor_session(config.proxy)
        floor = make_floor_forwarder([h.url for h in system.hosted.values()], floor_session)
        floor_server = await loop.create_server(floor, config.balancer.host, 0)
        upstream_pool = Transport.from_config(config.proxy)
        transport = make_transport_forwarder([h.url for h in system.hosted.values()], upstream_pool)
        transport_server = await loop.create_server(transport, config.balancer.host, 0)
        front_endpoints = itertools.cycle([upstream_pool.endpoint(h.url) for h in system.hosted.values()])
        front_server = await loop.create_server(lambda: HttptoolsFront(front_endpoints), config.balancer.host, 0)
        try:
            bare_bound = bare_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready = {
                "loop": type(loop).__module__.split(".")[0],
                "balancer": system.balancer_url,
                "backends": {name: hosted.url for name, hosted in system.hosted.items()},
                "bare": f"http://{config.balancer.host}:{bare_bound}",
                "floor": f"http://{config.balancer.host}:{floor_server.sockets[0].getsockname()[1]}",
                "transport": f"http://{config.balancer.host}:{transport_server.sockets[0].getsockname()[1]}",
                "httptools": f"http://{config.balancer.host}:{front_server.sockets[0].getsockname()[1]}",
            }
            print(json.dumps(ready), flush=True)
            await stop.wait()
        finally:
            front_server.close()
            await front_server.wait_closed()
            transport_server.close()
            await transport_server.wait_closed()
            await transport.shutdown(1.0)
            await upstream_pool.close()
            floor_server.close()
            await floor_server.wait_closed()
            await floor.shutdown(1.0)
            await floor_session.close()
            await bare_runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--bare-port", type=int, default=0)
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    listener = configure_logging(load_config(args.config).log, console=False)
    try:
        with asyncio.Runner(loop_factory=new_event_loop_factory()) as runner:
            runner.run(serve(args.config, args.bare_port, args.watch_stdin))
    finally:
        listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
