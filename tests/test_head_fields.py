"""The backend's request head built from a client's raw header lines (`upstream_head_fields`) is
byte for byte the one built from the edited header copy (`upstream_headers`): whoever the client
is, whatever it sends, from whichever address, with or without a Host override."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from lb_system.proxy.headers import HeaderPolicy
from lb_system.upstream.http11 import HeadFields, build_head

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"

Send = Callable[..., Awaitable[bytes]]


def head(method: str, fields: HeadFields, body_length: int | None) -> bytes:
    return build_head(method, "/p?q=1", fields, "backend:8080", body_length=body_length, streamed=False).data


@pytest.fixture
async def send() -> AsyncIterator[Send]:
    """A real aiohttp server whose handler builds the backend's head both ways and answers the new
    one after checking it equals the old; `send(raw, source)` writes a raw request from `source`."""
    policy = HeaderPolicy([f"{TRUSTED}/32"])

    async def handler(request: web.Request) -> web.Response:
        request_id = request.query.get("id", "req-1")
        host = request.query.get("host")
        body = await request.read()
        length = len(body) if request.can_read_body else None
        old = policy.upstream_headers(request, request_id)
        if host is not None:
            old["Host"] = host
        expected = head(request.method, HeadFields.from_pairs(old.items()), length)
        got = head(request.method, policy.upstream_head_fields(request, request_id, host), length)
        assert got == expected
        return web.Response(body=got)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    connections: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def send_one(raw: bytes, source: str = UNTRUSTED) -> bytes:
        if source not in connections:  # one keep-alive connection per client address
            connections[source] = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        reader, writer = connections[source]
        writer.write(raw)
        status = await reader.readline()
        if status[8:13] == b" 100 ":  # Expect: 100-continue
            await reader.readline()
            status = await reader.readline()
        assert status[8:13] == b" 200 ", status
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        if b" HTTP/1.0\r\n" in raw:  # the server closes after the answer
            writer.close()
            del connections[source]
        return body

    try:
        yield send_one
    finally:
        for _, writer in connections.values():
            writer.close()
        await runner.cleanup()


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")[1:-2]


async def test_a_plain_request_gets_the_proxys_lines_after_its_own(send: Send) -> None:
    got = await send(b"GET /p?q=1 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n")
    assert lines(got) == [
        b"Host: shop.example",
        b"User-Agent: t",
        b"Accept: */*",
        b"X-Forwarded-For: " + UNTRUSTED.encode(),
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: shop.example",
        b"Via: 1.1 lb_system",
        b"X-Request-ID: req-1",
    ]


async def test_two_clients_on_keep_alive_connections_each_get_their_own_address(send: Send) -> None:
    for _ in range(2):
        for source in (TRUSTED, UNTRUSTED):
            got = await send(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n", source)
            assert b"\r\nX-Forwarded-For: " + source.encode() + b"\r\n" in got


async def test_a_trusted_proxys_forwarded_headers_are_kept_an_untrusted_clients_replaced(send: Send) -> None:
    raw = b"GET /p HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nVia: 1.0 edge\r\n\r\n"
    trusted = await send(raw, TRUSTED)
    assert b"\r\nX-Forwarded-For: 6.6.6.6, " + TRUSTED.encode() + b"\r\nX-Forwarded-Proto: https\r\n" in trusted
    untrusted = await send(raw, UNTRUSTED)
    assert b"\r\nX-Forwarded-For: " + UNTRUSTED.encode() + b"\r\nX-Forwarded-Proto: http\r\n" in untrusted
    assert b"\r\nVia: 1.0 edge, 1.1 lb_system\r\n" in untrusted
    # And the plain request after them, on the same connections, carries nothing of theirs.
    for source in (TRUSTED, UNTRUSTED):
        plain = await send(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n", source)
        assert b"6.6.6.6" not in plain and b"edge" not in plain and b"https" not in plain


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /p?host=override.example HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
        b"GET /p?host=override.example HTTP/1.0\r\n\r\n",
        b"GET /p HTTP/1.0\r\nX-Forwarded-Host: evil\r\n\r\n",
        b"GET /p HTTP/1.0\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nIdempotency-Key: k\r\n\r\nabc",
        b"POST /p HTTP/1.1\r\nHost: a\r\nx-idempotency-key: k\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nTE: trailers\r\n\r\n",
        b"GET /p?id=client-id HTTP/1.1\r\nHost: a\r\nX-Request-ID: client-id\r\nX-Two: 1\r\nx-two: 2\r\n\r\n",
    ],
    ids=["host_override", "host_override_no_host", "http10_forwarded_host", "http10", "length", "chunked", "connection", "ids"],
)
async def test_every_shape_of_request_gets_the_same_head_both_ways(send: Send, raw: bytes) -> None:
    for source in (TRUSTED, UNTRUSTED):
        await send(raw, source)  # the handler asserts the two heads are equal


@pytest.mark.parametrize(
    "name",
    [
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Via",
        "X-Request-ID",
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Upgrade",
    ],
)
async def test_each_header_the_proxy_drops_or_edits_alone_gets_the_same_head_both_ways(send: Send, name: str) -> None:
    for source in (TRUSTED, UNTRUSTED):
        await send(f"GET /p HTTP/1.1\r\nHost: a\r\n{name.lower()}: v1\r\nAccept: */*\r\n\r\n".encode(), source)
    await send(b"POST /p HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx")


async def test_an_override_or_an_id_cannot_smuggle_a_header(send: Send) -> None:
    policy = HeaderPolicy([])
    requests: list[web.Request] = []

    async def keep(request: web.Request) -> web.Response:
        requests.append(request)
        return web.Response()

    app = web.Application()
    app.router.add_get("/", keep)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readline()
        writer.close()
    finally:
        await runner.cleanup()
    (request,) = requests
    assert head("GET", policy.upstream_head_fields(request, "ok"), None).startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    for request_id, host in (("x\r\nX-Injected: 1", None), ("ok", "a\r\nX-Injected: 1"), ("x\nX-Injected: 1", None)):
        with pytest.raises(ValueError):
            head("GET", policy.upstream_head_fields(request, request_id, host), None)
