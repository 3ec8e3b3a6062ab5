"""The upstream transport against real misbehaving servers: what the caller gets, and that the
pool still works for the next request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # Windows: plain asyncio only
    uvloop = None  # type: ignore[assignment]

import pytest
import trustme
from support.misbehaving import (
    Behaviour,
    FullBacklog,
    ScriptedServer,
    answer,
    close_when_idle,
    echo,
    endless_chunk_extension,
    endless_chunk_line,
    endless_header_line,
    endless_header_lines,
    gated,
    half_closing_upgrade,
    hang_up,
    huge_field,
    interim_answers,
    many_fields,
    many_trailers,
    raw,
    refused_port,
    reset,
    stall,
    stream,
    upgrade_and_echo,
)
from support.waiting import wait_for

from lb_system.upstream import (
    ConnectError,
    ConnectionRefused,
    ConnectionState,
    ConnectTimeout,
    Endpoint,
    FramingTooLarge,
    HeadFields,
    HeadLimits,
    HeadTooLarge,
    PoolTimeout,
    ProtocolError,
    ReadError,
    Timeout,
    TooManyInterim,
    Transport,
    TunnelLimitReached,
    UpstreamError,
)

Serve = Callable[..., Awaitable[ScriptedServer]]
MakeTransport = Callable[..., Transport]


@contextlib.asynccontextmanager
async def scripted_servers() -> AsyncIterator[Serve]:
    """Start ScriptedServers at will; all closed on the way out."""
    servers: list[ScriptedServer] = []

    async def start(*script: Behaviour, **options: Any) -> ScriptedServer:
        server = await ScriptedServer.start(*script, **options)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@contextlib.asynccontextmanager
async def transports() -> AsyncIterator[MakeTransport]:
    """Make Transports at will; all closed on the way out."""
    made: list[Transport] = []

    def make(**options: Any) -> Transport:
        options.setdefault("connect_timeout", 2.0)
        transport = Transport(**options)
        made.append(transport)
        return transport

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with scripted_servers() as start:
        yield start


@pytest.fixture
async def make_transport() -> AsyncIterator[MakeTransport]:
    async with transports() as make:
        yield make


async def fetch(endpoint: Endpoint, method: str = "GET", target: str = "/", **options: Any) -> tuple[int, bytes]:
    response = await endpoint.request(method, target, **options)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def fails(request: Awaitable[Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await request
    return caught.value


async def test_keep_alive_reuses_one_connection(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve()
    endpoint = make_transport().endpoint(server.url)
    exchange = await endpoint.request("GET", "/")
    assert await exchange.read() == b"ok"
    assert exchange.state is ConnectionState.IDLE  # arrived whole, both sides keep alive: reusable
    exchange.release()
    for _ in range(5):
        assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1
    assert endpoint.idle_connections == 1


async def test_a_released_answer_is_freed_without_the_garbage_collector(serve: Serve, make_transport: MakeTransport) -> None:
    # A reference cycle per request (the parser holding the answer's callbacks) would leave every
    # answer to the collector's passes, which under load cost CPU and latency.
    server = await serve()
    endpoint = make_transport().endpoint(server.url)
    gc.disable()
    try:
        response = await endpoint.request("GET", "/")
        assert await response.read() == b"ok"
        response.release()
        freed = weakref.ref(response)
        del response
        assert freed() is None
    finally:
        gc.enable()
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_refused_connection_says_so_and_the_next_one_works(serve: Serve, make_transport: MakeTransport) -> None:
    port = refused_port()
    endpoint = make_transport().endpoint(f"http://127.0.0.1:{port}")
    error = await fails(fetch(endpoint))
    assert (error.reason, error.connecting, error.sent) == ("connection refused", True, False)
    assert isinstance(error, ConnectionRefused)
    assert endpoint.open_connections == 0
    await serve(port=port)
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_reset_after_the_request_is_connection_reset(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(reset)
    endpoint = make_transport().endpoint(server.url)
    error = await fails(fetch(endpoint))
    assert (error.reason, error.connecting, error.sent) == ("connection reset", False, True)
    assert isinstance(error, ReadError)
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2  # a fresh connection that failed is not retried


async def test_a_full_backlog_is_a_connect_timeout(make_transport: MakeTransport) -> None:
    backlog = FullBacklog()
    try:
        await backlog.fill()
        endpoint = make_transport(connect_timeout=0.2).endpoint(f"http://127.0.0.1:{backlog.port}")
        error = await fails(fetch(endpoint, timeout=5.0))  # a connect that went through fails as "timeout"
        assert (error.reason, error.connecting) == ("connect timeout", True)
        assert isinstance(error, ConnectTimeout)
        assert endpoint.open_connections == 0
        server = await backlog.start_accepting()
        try:
            assert await fetch(endpoint) == (200, b"ok")
        finally:
            await server.close()
    finally:
        backlog.close()


async def test_a_short_wait_after_a_long_one_on_the_same_connection_times_out_on_time(
    serve: Serve, make_transport: MakeTransport
) -> None:
    """A connection's one timer is armed for the first wait's 30 s; the next wait's 0.1 s must
    re-arm it, not wait behind it (the outer 10 s bound would fail the test with TimeoutError)."""
    server = await serve(answer(), stall())
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    assert await fetch(endpoint, timeout=30) == (200, b"ok")
    error = await asyncio.wait_for(fails(endpoint.request("GET", "/", timeout=0.1)), 10)
    assert (error.reason, error.answered) == ("timeout", False)
    assert server.accepted == 1  # both waits on the same connection


async def test_a_long_wait_after_a_short_one_on_the_same_connection_is_not_cut_short(
    serve: Serve, make_transport: MakeTransport
) -> None:
    """The timer armed for the first wait's 0.05 s fires during the second wait, which has 30 s:
    it is re-armed, and the answer that comes after 0.05 s is the caller's."""
    gate = asyncio.Event()
    server = await serve(answer(), gated(gate))
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    assert await fetch(endpoint, timeout=0.05) == (200, b"ok")
    second = asyncio.create_task(fetch(endpoint, timeout=30))
    await wait_for(lambda: len(server.requests) == 2)
    await asyncio.sleep(0.2)  # past the first wait's expiry: the timer fired and found a later one
    gate.set()
    assert await second == (200, b"ok")
    assert server.accepted == 1


async def test_a_body_that_arrived_whole_is_taken_without_a_wait(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(answer(body=b"whole"), stall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/")
    arrived: list[bytes] = []

    def taken() -> bool:
        data = response.body_arrived()
        if data is not None:
            arrived.append(data)
        return data is not None

    await wait_for(taken)
    assert arrived == [b"whole"]
    assert await response.read() == b""  # all of it was taken
    assert response.state is ConnectionState.IDLE
    response.release()
    partial = await endpoint.request("GET", "/", read_timeout=0.1)
    await wait_for(lambda: partial.body_arrived() is None and bool(partial.content_length))
    assert await partial.read_chunk() == b"abc"  # a body still coming is read as ever
    partial.release()
    assert server.accepted == 1  # the first answer taken whole left its connection reusable


async def test_headers_then_a_stall_is_a_timeout(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(stall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/", read_timeout=0.1)
    assert (response.status, response.content_length) == (200, 10)
    assert await response.read_chunk() == b"abc"
    error = await fails(response.read_chunk())
    assert (error.reason, error.answered) == ("timeout", True)
    response.release()
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_no_answer_at_all_is_a_timeout(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(stall())
    endpoint = make_transport().endpoint(server.url)
    error = await fails(fetch(endpoint, timeout=0.1))
    assert (error.reason, error.sent, error.answered) == ("timeout", True, False)
    assert endpoint.open_connections == 0
    assert await fetch(endpoint) == (200, b"ok")


async def test_garbage_is_a_bad_response(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"SSH-2.0-OpenSSH_9.6\r\n", keep=True))
    endpoint = make_transport().endpoint(server.url)
    error = await fails(fetch(endpoint))
    assert (error.reason, type(error)) == ("bad response", ProtocolError)
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_a_body_shorter_than_its_length_is_incomplete(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten.."))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/")
    assert response.content_length == 100
    assert (await fails(response.read())).reason == "response body incomplete"
    response.release()
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_close_mid_chunk_is_incomplete(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\n12345"))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/")
    assert response.chunked and response.has_body
    assert (await fails(response.read())).reason == "response body incomplete"
    response.release()
    assert await fetch(endpoint) == (200, b"ok")


async def test_informational_answers_are_skipped(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(
        raw(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone",
            keep=True,
        )
    )
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("POST", "/tasks", body=b"{}")
    assert (response.status, response.reason) == (201, "Created")
    assert response.headers == [("Content-Length", "4"), ("X-Final", "yes")]
    assert await response.read() == b"done"
    response.release()
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


# --- bounds on what a backend sends outside a body (issue #16) --------------------------------


@pytest.mark.parametrize(
    ("cast", "expected"),
    [
        (huge_field, (HeadTooLarge, "upstream response headers too large")),
        (many_fields, (HeadTooLarge, "upstream response headers too large")),
        (endless_header_lines, (HeadTooLarge, "upstream response headers too large")),
        (endless_header_line, (HeadTooLarge, "upstream response headers too large")),
        (interim_answers, (TooManyInterim, "too many interim responses")),
        # One past each bound (the bounds taken whole are in the next test): 100 fields and Content-Length, 11 interim.
        (lambda: many_fields(100), (HeadTooLarge, "upstream response headers too large")),
        (lambda: interim_answers(11), (TooManyInterim, "too many interim responses")),
    ],
)
async def test_a_head_past_a_bound_is_refused_and_its_connection_closed(
    serve: Serve, make_transport: MakeTransport, cast: Callable[[], Behaviour], expected: tuple[type[UpstreamError], str]
) -> None:
    server = await serve(cast())
    endpoint = make_transport().endpoint(server.url)
    error = await fails(fetch(endpoint, timeout=5.0))
    assert (type(error), error.reason) == expected
    assert (error.sent, error.answered) == (True, True)
    assert endpoint.open_connections == 0, "the connection is closed, not pooled"
    await wait_for(lambda: server.open == 0, message="the backend seeing its connection closed")
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_a_head_within_its_bounds_is_taken_whole(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(huge_field(60 * 1024), many_fields(99), interim_answers(10), many_trailers(99))
    endpoint = make_transport().endpoint(server.url)
    for _ in range(4):
        assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


async def test_the_bounds_are_the_pools_to_set(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(many_fields(10), huge_field(2100), many_fields(9))
    endpoint = make_transport(head_limits=HeadLimits(max_bytes=2048, max_fields=10)).endpoint(server.url)
    assert isinstance(await fails(fetch(endpoint)), HeadTooLarge), "10 fields and Content-Length: 11"
    assert isinstance(await fails(fetch(endpoint)), HeadTooLarge), "a head of 2,100 bytes and more"
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_read_beyond_the_heads_room_is_parsed_in_pieces(serve: Serve, make_transport: MakeTransport) -> None:
    # The parser is fed no more than the bound leaves room for while a head is unfinished: what
    # follows a head within the room (an interim answer, the body, a tunnel's bytes) is not lost.
    field = b"X-Near: " + b"n" * 1500 + b"\r\n"
    body = bytes(range(256)) * 40
    server = await serve(
        raw(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n" + field + b"Content-Length: %d\r\n\r\n" % len(body) + body,
            keep=True,
        ),
        raw(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n" + body),
    )
    endpoint = make_transport(head_limits=HeadLimits(max_bytes=2048)).endpoint(server.url)
    assert await fetch(endpoint) == (200, body)
    response = await endpoint.open_tunnel("GET", "/ws", [("Upgrade", "x"), ("Connection", "Upgrade")])
    tunnel = response.detach()
    received = b""
    while chunk := await tunnel.read():
        received += chunk
    tunnel.close()
    assert received == body


@pytest.mark.parametrize("cast", [endless_chunk_line, endless_chunk_extension, many_trailers])
async def test_chunk_framing_past_the_bound_fails_the_body(
    serve: Serve, make_transport: MakeTransport, cast: Callable[[], Behaviour]
) -> None:
    server = await serve(cast())
    endpoint = make_transport().endpoint(server.url)
    # The head may be read before the framing breaks, or with it (then the request itself fails).
    error = await fails(fetch(endpoint))
    assert (type(error), error.reason, error.answered) == (FramingTooLarge, "upstream chunk line or trailers too large", True)
    assert endpoint.open_connections == 0
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_a_connection_closed_while_idle_costs_nothing(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(close_when_idle)
    endpoint = make_transport().endpoint(server.url)
    assert await fetch(endpoint) == (200, b"ok")
    await wait_for(lambda: endpoint.idle_connections == 0, message="the pool seeing the backend close an idle connection")
    # A POST is never retried: it only succeeds if the dead connection was skipped before writing.
    assert await fetch(endpoint, "POST", body=b"x") == (200, b"ok")
    assert server.accepted == 2 and len(server.requests) == 2


async def test_a_body_ended_by_close(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/")
    assert response.close_delimited and response.content_length is None and not response.chunked
    assert await response.read() == b"until the end"
    response.release()
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_head_with_a_length_reads_no_body(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", keep=True))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("HEAD", "/", read_timeout=5)
    assert (response.status, response.has_body, response.header("content-length")) == (200, False, "1000")
    assert await response.read() == b""
    response.release()
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
    ],
)
async def test_head_without_a_length_keeps_its_connection(
    serve: Serve, make_transport: MakeTransport, head: bytes, kept: bool
) -> None:
    # llhttp would wait for a body ended by a close: the Connection header and the version decide.
    server = await serve(raw(head, keep=kept))
    endpoint = make_transport().endpoint(server.url)
    assert await fetch(endpoint, "HEAD", read_timeout=5) == (200, b"")
    assert endpoint.idle_connections == (1 if kept else 0)
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == (1 if kept else 2)


async def test_not_modified_has_no_body(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n', keep=True))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/", headers=[("If-None-Match", '"v1"')])
    assert (response.status, response.has_body, await response.read()) == (304, False, b"")
    response.release()
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


async def test_no_content_has_no_body(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(answer(204, b"", reason="No Content"))
    endpoint = make_transport().endpoint(server.url)
    assert await fetch(endpoint, "DELETE", "/tasks/1") == (204, b"")
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


@pytest.mark.parametrize("side", ["backend", "balancer"])
async def test_connection_close_from_either_side_is_not_reused(serve: Serve, make_transport: MakeTransport, side: str) -> None:
    server = await serve(answer(headers=(("Connection", "close"),)) if side == "backend" else answer())
    endpoint = make_transport().endpoint(server.url)
    headers = [("Connection", "close")] if side == "balancer" else []
    exchange = await endpoint.request("GET", "/", headers)
    assert (await exchange.read(), exchange.state) == (b"ok", ConnectionState.CLOSED)
    exchange.release()
    assert endpoint.idle_connections == 0
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


async def test_the_cap_holds_and_waiters_go_in_turn(serve: Serve, make_transport: MakeTransport) -> None:
    gate = asyncio.Event()
    server = await serve(*[gated(gate)] * 5)
    endpoint = make_transport(max_connections_per_backend=2).endpoint(server.url)
    requests = [asyncio.create_task(fetch(endpoint)) for _ in range(5)]
    await wait_for(lambda: len(server.requests) == 2 and endpoint.waiting == 3)
    gate.set()
    assert await asyncio.gather(*requests) == [(200, b"ok")] * 5
    assert (server.accepted, server.most_open) == (2, 2)


async def test_the_wait_for_a_connection_is_bounded(serve: Serve, make_transport: MakeTransport) -> None:
    gate = asyncio.Event()
    server = await serve(gated(gate))
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    holder = asyncio.create_task(fetch(endpoint))
    await wait_for(lambda: len(server.requests) == 1)
    with pytest.raises(PoolTimeout) as caught:
        await fetch(endpoint, wait_timeout=0.05)
    assert (caught.value.reason, caught.value.sent) == ("timeout", False)
    assert endpoint.waiting == 0
    gate.set()
    assert await holder == (200, b"ok")
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


async def test_a_deadline_bounds_the_wait_for_a_connection_and_for_the_head(serve: Serve, make_transport: MakeTransport) -> None:
    # One deadline per try, kept by the transport's own timers: no timeout scope around the call.
    gate = asyncio.Event()
    server = await serve(gated(gate), stall())
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    loop = asyncio.get_running_loop()
    holder = asyncio.create_task(fetch(endpoint))
    await wait_for(lambda: len(server.requests) == 1)
    error = await fails(fetch(endpoint, deadline=loop.time() + 0.05))  # queued behind the holder
    assert (error.reason, error.sent) == ("timeout", False)
    assert isinstance(error, PoolTimeout), "the wait for our own pool ran out, not the backend"
    gate.set()
    assert await holder == (200, b"ok")
    error = await fails(fetch(endpoint, deadline=loop.time() + 0.05))  # sent; the backend stalls
    assert (error.reason, error.sent, error.answered) == ("timeout", True, False)
    assert isinstance(error, Timeout) and not isinstance(error, PoolTimeout)
    assert endpoint.open_connections == 0 and endpoint.waiting == 0
    error = await fails(fetch(endpoint, deadline=loop.time() - 1))  # already past: nothing is sent
    assert (error.reason, error.sent) == ("timeout", False)
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_deadline_bounds_the_body_read_whole(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(stall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    endpoint = make_transport().endpoint(server.url)
    loop = asyncio.get_running_loop()
    response = await endpoint.request("GET", "/", read_timeout=30)
    error = await fails(response.read(deadline=loop.time() + 0.05))
    assert (error.reason, error.answered) == ("timeout", True)
    response.release()
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_deadline_before_the_connect_timeout_is_the_callers_timeout(make_transport: MakeTransport) -> None:
    backlog = FullBacklog()
    try:
        await backlog.fill()
        endpoint = make_transport(connect_timeout=5.0).endpoint(f"http://127.0.0.1:{backlog.port}")
        error = await fails(fetch(endpoint, deadline=asyncio.get_running_loop().time() + 0.1))
        assert (error.reason, error.connecting) == ("timeout", True)  # not the backend's "connect timeout"
        assert endpoint.open_connections == 0
    finally:
        backlog.close()


async def test_a_retired_endpoint_closes_its_connections_once_idle(serve: Serve, make_transport: MakeTransport) -> None:
    # A moved backend's old address: nothing new goes there, and nothing lingers once idle.
    gate = asyncio.Event()
    server = await serve(gated(gate), answer())
    pool = make_transport()
    endpoint = pool.endpoint(server.url)
    busy = asyncio.create_task(fetch(endpoint))
    await wait_for(lambda: len(server.requests) == 1)
    assert await fetch(endpoint) == (200, b"ok")  # a second connection, now idle
    assert (server.open, endpoint.idle_connections) == (2, 1)
    pool.retire(server.url)
    assert not pool.has_endpoint(server.url)
    await wait_for(lambda: server.open == 1, message="the idle connection closed at once")
    gate.set()
    assert await busy == (200, b"ok")  # the busy one finishes its exchange...
    await wait_for(lambda: server.open == 0, message="...and closes instead of going back to a pool")
    assert endpoint.connections == 0


async def test_idle_connections_close_after_the_idle_timeout(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve()
    endpoint = make_transport(idle_timeout=0.05).endpoint(server.url)
    assert await fetch(endpoint) == (200, b"ok")
    await wait_for(lambda: server.open == 0 and endpoint.open_connections == 0, message="the idle connection closed")
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_large_body_streams_with_bounded_memory(serve: Serve, make_transport: MakeTransport) -> None:
    total = 200 * 1024 * 1024
    server = await serve(stream(total))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.request("GET", "/big")
    assert response.content_length == total
    received = len(await response.read_chunk())
    # A slow reader: the transport stops reading, so the backend's writes stall in its socket.
    await wait_for(lambda: response._flow.read_paused and server.draining, message="the backend paused by flow control")
    stalled_at = server.sent
    assert stalled_at < 64 * 1024 * 1024
    largest = 0
    while chunk := await response.read_chunk():
        received += len(chunk)
        largest = max(largest, len(chunk))
    response.release()
    assert received == total
    assert largest < 4 * 1024 * 1024  # never more than a bounded buffer at once
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 1


async def test_an_idempotent_request_is_retried_once_when_a_reused_connection_dies(
    serve: Serve, make_transport: MakeTransport
) -> None:
    server = await serve(answer(), hang_up)
    endpoint = make_transport().endpoint(server.url)
    assert await fetch(endpoint) == (200, b"ok")
    assert await fetch(endpoint, "GET", "/again") == (200, b"ok")
    assert server.accepted == 2
    assert [r.target for r in server.requests] == ["/", "/again", "/again"]


async def test_a_post_is_not_retried_when_a_reused_connection_dies(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(answer(), hang_up)
    endpoint = make_transport().endpoint(server.url)
    assert await fetch(endpoint) == (200, b"ok")
    error = await fails(fetch(endpoint, "POST", "/tasks", body=b"{}"))
    assert (error.reason, error.sent, error.answered) == ("server disconnected", True, False)
    assert server.accepted == 1 and len(server.requests) == 2
    assert await fetch(endpoint) == (200, b"ok")


async def test_a_fresh_connection_that_dies_is_not_retried(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(hang_up)
    endpoint = make_transport().endpoint(server.url)
    assert (await fails(fetch(endpoint))).reason == "server disconnected"
    assert server.accepted == 1


async def test_request_bodies_are_framed_by_the_transport(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(echo, echo, echo)
    endpoint = make_transport().endpoint(server.url)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"abc", b"", b"defgh"):
            yield piece

    caller_framing = [("Content-Length", "999"), ("Transfer-Encoding", "gzip")]
    assert await fetch(endpoint, "POST", headers=caller_framing, body=b"whole") == (200, b"whole")
    assert await fetch(endpoint, "PUT", body=pieces()) == (200, b"abcdefgh")
    assert await fetch(endpoint, "PUT", body=pieces(), body_length=8) == (200, b"abcdefgh")
    whole, chunked, sized = server.requests
    assert (whole.header("Content-Length"), whole.header("Transfer-Encoding")) == ("5", None)
    assert chunked.chunked and chunked.header("Content-Length") is None
    assert not sized.chunked and sized.header("Content-Length") == "8"
    assert whole.header("Host") == f"127.0.0.1:{server.port}"
    assert server.accepted == 1


async def test_the_callers_host_header_is_kept(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve()
    endpoint = make_transport().endpoint(server.url)
    await fetch(endpoint, "GET", "/a?b=%20c", headers=[("Host", "example.org"), ("X-Two", "1"), ("x-two", "2")])
    (seen,) = server.requests
    assert (seen.target, seen.header("Host")) == ("/a?b=%20c", "example.org")
    assert [(n, v) for n, v in seen.headers if n.lower() == "x-two"] == [("X-Two", "1"), ("x-two", "2")]


async def test_a_header_cannot_smuggle_another(make_transport: MakeTransport) -> None:
    endpoint = make_transport().endpoint("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await endpoint.request("GET", "/", headers=[("X-A", "1\r\nX-Injected: yes")])


async def test_header_lines_built_beforehand_are_sent_as_they_are(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(answer(), answer())
    endpoint = make_transport().endpoint(server.url)
    fields = HeadFields(b"X-One: 1\r\nx-two: 2\r\n", 2, False)
    assert await fetch(endpoint, "GET", "/a", headers=fields) == (200, b"ok")
    assert await fetch(endpoint, "POST", "/b", headers=fields, body=b"abc") == (200, b"ok")
    got, posted = server.requests
    host = ("Host", f"127.0.0.1:{server.port}")
    assert got.headers == [("X-One", "1"), ("x-two", "2"), host]
    assert posted.headers == [("X-One", "1"), ("x-two", "2"), host, ("Content-Length", "3")]
    assert posted.body == b"abc"


@pytest.mark.parametrize("data", [b"X-A: 1\nX-B: 2\r\n", b"X-A: 1\rX-B: 2\r\n", b"X-A: 1\r\nX-B: 2\r\n"])
async def test_header_lines_built_beforehand_cannot_smuggle_another(make_transport: MakeTransport, data: bytes) -> None:
    endpoint = make_transport().endpoint("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await endpoint.request("GET", "/", headers=HeadFields(data, 1, True))


@pytest.mark.parametrize(
    ("behaviour", "hop_by_hop", "chunked", "length"),
    [
        (answer(headers=(("Server", "s"), ("X-Answer", "1"))), False, False, 2),
        (answer(headers=(("Connection", "X-Private"), ("X-Private", "1"))), True, False, 2),
        (answer(headers=(("Keep-Alive", "timeout=5"),)), True, False, 2),
        (answer(headers=(("trailer", "X-Sum"),)), True, False, 2),
        (raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", keep=True), True, True, None),
        # An interim answer's headers are not the answer's: its Upgrade and length are forgotten.
        (
            raw(
                b"HTTP/1.1 103 Early Hints\r\nUpgrade: x\r\nContent-Length: 9\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                keep=True,
            ),
            False,
            False,
            2,
        ),
    ],
    ids=["none", "connection", "keep_alive", "trailer", "chunked", "after_interim"],
)
async def test_an_answer_says_whether_it_has_hop_by_hop_headers(
    serve: Serve, make_transport: MakeTransport, behaviour: Behaviour, hop_by_hop: bool, chunked: bool, length: int | None
) -> None:
    server = await serve(behaviour)
    response = await make_transport().endpoint(server.url).request("GET", "/")
    try:
        assert (response.hop_by_hop, response.chunked, response.content_length) == (hop_by_hop, chunked, length)
        assert await response.read() == b"ok"
    finally:
        response.release()


async def test_a_failing_upload_source_is_the_callers_error(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(stall())
    endpoint = make_transport().endpoint(server.url)

    class TooLarge(Exception):
        pass

    async def upload() -> AsyncIterator[bytes]:
        yield b"first"
        raise TooLarge

    with pytest.raises(TooLarge):
        await endpoint.request("POST", "/", body=upload(), timeout=5)
    assert endpoint.open_connections == 0


async def test_a_dedicated_request_does_not_wait_for_the_pool(serve: Serve, make_transport: MakeTransport) -> None:
    gate = asyncio.Event()
    server = await serve(gated(gate))
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    holder = asyncio.create_task(fetch(endpoint))
    await wait_for(lambda: len(server.requests) == 1)
    assert await fetch(endpoint, "GET", "/health", dedicated=True) == (200, b"ok")
    assert endpoint.open_connections == 1
    gate.set()
    assert await holder == (200, b"ok")
    assert (server.open, endpoint.open_connections, endpoint.idle_connections) == (2, 1, 1)


async def test_health_checks_keep_one_connection_alive_between_checks(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(answer(), answer(), answer(), close_when_idle)
    endpoint = make_transport().endpoint(server.url)
    for _ in range(3):
        assert await fetch(endpoint, "GET", "/health", dedicated=True) == (200, b"ok")
    assert (server.accepted, server.open) == (1, 1), "one connection, kept from check to check"
    assert endpoint.open_connections == 0, "outside the pool"
    assert await fetch(endpoint, "GET", "/health", dedicated=True) == (200, b"ok")
    await wait_for(lambda: server.open == 0, message="the backend closed it while idle")
    assert await fetch(endpoint, "GET", "/health", dedicated=True) == (200, b"ok")  # a new one, no failed check
    assert server.accepted == 2


async def test_a_tunnel_carries_raw_bytes_outside_the_pool(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(upgrade_and_echo)
    endpoint = make_transport(max_connections_per_backend=1, max_tunnels_per_backend=1).endpoint(server.url)
    response = await endpoint.open_tunnel("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
    assert (response.status, response.header("Upgrade")) == (101, "websocket")
    tunnel = response.detach()
    assert await tunnel.read() == b"hello"
    tunnel.write(b"ping")
    await tunnel.drain()
    assert await tunnel.read() == b"ping"
    assert endpoint.open_tunnels == 1
    with pytest.raises(TunnelLimitReached):
        await endpoint.open_tunnel("GET", "/ws")
    # HTTP still flows on the pool while the tunnel is open.
    assert await fetch(endpoint) == (200, b"ok")
    tunnel.close()
    assert endpoint.open_tunnels == 0
    assert tunnel.closed


async def test_a_tunnel_sees_the_backend_close(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nbye"))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.open_tunnel("GET", "/", [("Upgrade", "x"), ("Connection", "Upgrade")])
    tunnel = response.detach()
    assert await tunnel.read() == b"bye"
    assert await tunnel.read() == b""
    tunnel.close()
    await wait_for(lambda: endpoint.open_tunnels == 0)


async def test_a_tunnel_half_closed_by_the_backend_still_carries_bytes_to_it(serve: Serve, make_transport: MakeTransport) -> None:
    received = bytearray()
    server = await serve(half_closing_upgrade(received))
    endpoint = make_transport().endpoint(server.url)
    response = await endpoint.open_tunnel("GET", "/", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
    tunnel = response.detach()
    assert await tunnel.read() == b"bye"
    assert await tunnel.read() == b""  # its FIN: it sends no more...
    tunnel.write(b"still heard")  # ...but it still reads
    tunnel.write_eof()
    await wait_for(lambda: bytes(received) == b"still heard", message="the backend read after its half-close")
    await wait_for(lambda: server.open == 0, message="both directions ended")
    tunnel.close()
    assert endpoint.open_tunnels == 0


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


async def test_https_backends_are_verified(
    serve: Serve, make_transport: MakeTransport, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1").configure_cert(server_context)
    server = await serve(ssl_context=server_context)
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))

    trusted = make_transport(ca_file=str(ca_file)).endpoint(server.url)
    assert await fetch(trusted) == (200, b"ok")
    assert await fetch(trusted) == (200, b"ok")
    assert server.accepted == 1

    error = await fails(fetch(make_transport().endpoint(server.url)))
    assert (error.reason, error.connecting) == ("cannot connect", True)
    assert isinstance(error, ConnectError)


async def test_a_closed_pool_closes_its_connections(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve()
    pool = make_transport()
    endpoint = pool.endpoint(server.url)
    assert await fetch(endpoint) == (200, b"ok")
    await pool.close()
    await wait_for(lambda: server.open == 0)
    assert (await fails(fetch(endpoint))).reason == "cannot connect"


async def test_a_cancelled_request_frees_its_connection(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(stall())
    endpoint = make_transport(max_connections_per_backend=1).endpoint(server.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the caller's own deadline, as the forwarder sets one
            await endpoint.request("GET", "/")
    assert endpoint.open_connections == 0
    assert await fetch(endpoint, wait_timeout=5) == (200, b"ok")


async def test_an_answer_before_the_whole_upload_closes_the_connection(serve: Serve, make_transport: MakeTransport) -> None:
    server = await serve(raw(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", keep=True), read_bodies=False)
    endpoint = make_transport().endpoint(server.url)
    more = asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await more.wait()  # the rest never comes while the answer is read
        yield b"y" * 10

    response = await endpoint.request("PUT", "/", body=upload(), body_length=20)
    assert response.status == 413
    response.release()
    assert endpoint.open_connections == 0  # half a request on the wire: never reused
    assert await fetch(endpoint) == (200, b"ok")
    assert server.accepted == 2


# The balancer runs on uvloop wherever it exists: every scenario above that needs only a server
# and a pool runs again on a uvloop event loop, whose transports differ in the details.
ON_BOTH_LOOPS = [
    scenario
    for name, scenario in sorted(globals().items())
    if name.startswith("test_")
    and inspect.iscoroutinefunction(scenario)
    and list(inspect.signature(scenario).parameters) == ["serve", "make_transport"]
]


@pytest.mark.skipif(uvloop is None, reason="uvloop is not installed here")
@pytest.mark.parametrize("scenario", ON_BOTH_LOOPS, ids=lambda scenario: scenario.__name__.removeprefix("test_"))
def test_on_uvloop(scenario: Callable[[Serve, MakeTransport], Awaitable[None]]) -> None:
    async def run() -> None:
        async with scripted_servers() as serve, transports() as make_transport:
            await scenario(serve, make_transport)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
