"""A cast of real misbehaving HTTP servers on raw sockets (asyncio streams, no HTTP framework).

A `ScriptedServer` answers each request with the next behaviour of its script, then answers
200 "ok" forever, so a test sees both the failure and that the next request still works. It
counts the connections it accepted and keeps the requests it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeAlias


@dataclass
class Request:
    """What a test server read: the request line, headers in order, and the body (de-chunked)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


async def read_request(reader: asyncio.StreamReader, *, body: bool = True) -> Request | None:
    """One request from the stream (without its body unless `body`), or None when the client
    closed between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _ = line.split(" ", 2)
    headers = [(n.strip(), v.strip()) for n, v in (item.split(":", 1) for item in lines)]
    request = Request(method, target, headers, b"", chunked=False)
    if not body:
        return request
    if (request.header("Transfer-Encoding") or "").lower() == "chunked":
        request.chunked = True
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers
        request.body = b"".join(parts)
    elif length := int(request.header("Content-Length") or 0):
        request.body = await reader.readexactly(length)
    return request


Reader: TypeAlias = asyncio.StreamReader
Writer: TypeAlias = asyncio.StreamWriter
# A behaviour answers one request; True keeps the connection for the next one.
Behaviour = Callable[["ScriptedServer", Request, Reader, Writer], Awaitable[bool]]


def answer(status: int = 200, body: bytes = b"ok", headers: tuple[tuple[str, str], ...] = (), reason: str = "OK") -> Behaviour:
    """A well-formed answer with a Content-Length, keep-alive."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *(f"{n}: {v}" for n, v in headers)]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if request.method == "HEAD" else body))
        await writer.drain()
        return not any(n.lower() == "connection" and v.lower() == "close" for n, v in headers)

    return behave


def raw(data: bytes, *, keep: bool = False) -> Behaviour:
    """Write these bytes as they are, then close (or keep the connection when `keep`)."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return behave


async def reset(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
    """Read the request, then reset the connection (SO_LINGER 0: an RST, not a FIN)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return False


async def hang_up(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
    """Read the request, then close without a byte of answer."""
    return False


def stall(head: bytes = b"") -> Behaviour:
    """Send `head` (maybe nothing), then never another byte until the server closes."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        writer.write(head)
        await writer.drain()
        await asyncio.Event().wait()
        return False

    return behave


async def close_when_idle(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
    """Answer as keep-alive would, then close the idle connection anyway (a backend's idle timeout)."""
    await answer()(server, request, reader, writer)
    return False


def gated(gate: asyncio.Event) -> Behaviour:
    """Answer 200 once `gate` is set."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        await gate.wait()
        return await answer()(server, request, reader, writer)

    return behave


def stream(total: int, block: int = 1 << 20) -> Behaviour:
    """Send a `total`-byte body in blocks, waiting for the client to take each one; counts what
    was handed to the socket in `server.sent`, and `server.draining` says it waits for the client."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        data = b"x" * block
        left = total
        while left:
            piece = data[: min(block, left)]
            writer.write(piece)
            server.sent += len(piece)
            left -= len(piece)
            server.draining = True
            await writer.drain()
            server.draining = False
        return True

    return behave


async def echo(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
    """Answer with the request's body."""
    return await answer(body=request.body)(server, request, reader, writer)


async def upgrade_and_echo(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
    """Switch protocols (101), say hello, then echo raw bytes until the client closes."""
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello")
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    return False


def half_closing_upgrade(received: bytearray) -> Behaviour:
    """Switch protocols (101), say "bye" and half-close (a FIN), then go on reading: what the
    client still sends lands in `received`, until it closes too."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbye")
        writer.write_eof()
        while data := await reader.read(65536):
            received.extend(data)
        return False

    return behave


# --- heads past every bound (issue #16): each answer below is refused by the balancer -----------


def huge_field(size: int = 100 * 1024) -> Behaviour:
    """A 200 whose one header field is `size` bytes long."""
    return raw(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * size + b"\r\nContent-Length: 2\r\n\r\nok", keep=True)


def many_fields(count: int = 1000) -> Behaviour:
    """A 200 with `count` short header fields."""
    fields = b"".join(b"X-Field-%d: v\r\n" % n for n in range(count))
    return raw(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok", keep=True)


def interim_answers(count: int = 100) -> Behaviour:
    """`count` interim 103 Early Hints answers, then the final 200."""
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    return raw(hint * count + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=True)


def endless(start: bytes, line: bytes, block: int = 16 * 1024) -> Behaviour:
    """Send `start`, then `line` over and over until the client goes (counted in `server.sent`)."""
    data = line * max(1, block // len(line))

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        writer.write(start)
        while not writer.is_closing():
            writer.write(data)
            server.sent += len(data)
            await writer.drain()
        return False

    return behave


def endless_header_lines() -> Behaviour:
    """A 200 whose header lines never end: one short field after another."""
    return endless(b"HTTP/1.1 200 OK\r\n", b"X-More: again\r\n")


def endless_header_line() -> Behaviour:
    """A 200 whose one header field never ends."""
    return endless(b"HTTP/1.1 200 OK\r\nX-Endless: ", b"e")


def endless_chunk_line() -> Behaviour:
    """A chunked 200 whose first chunk-size line never ends (leading zeros, a valid size so far)."""
    return endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0")


def endless_chunk_extension() -> Behaviour:
    """A chunked 200 whose first chunk-size line has an extension that never ends."""
    return endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=", b"x")


def many_trailers(count: int = 1000) -> Behaviour:
    """A chunked 200, body "ok", then `count` trailer fields."""
    trailers = b"".join(b"X-Trailer-%d: v\r\n" % n for n in range(count))
    return raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + b"\r\n", keep=True)


def on_path(path: str, behaviour: Behaviour, otherwise: Behaviour) -> Behaviour:
    """`behaviour` for requests to `path` (say, a health check that passes), `otherwise` for the rest."""

    async def behave(server: ScriptedServer, request: Request, reader: Reader, writer: Writer) -> bool:
        chosen = behaviour if request.target.split("?", 1)[0] == path else otherwise
        return await chosen(server, request, reader, writer)

    return behave


@dataclass
class ScriptedServer:
    """A server that follows `script` one request at a time, then behaves as `then` (answers 200 "ok")."""

    script: deque[Behaviour] = field(default_factory=deque)
    ssl_context: ssl.SSLContext | None = None
    then: Behaviour = field(default_factory=answer)
    accepted: int = 0
    open: int = 0
    most_open: int = 0
    requests: list[Request] = field(default_factory=list)
    sent: int = 0
    draining: bool = False
    read_bodies: bool = True  # False: answer as soon as a request's head is in
    keep_requests: bool = True  # False: `requests` stays empty (a soak test's memory is the balancer's)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    async def start(
        cls,
        *script: Behaviour,
        port: int = 0,
        sock: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
        read_bodies: bool = True,
        then: Behaviour | None = None,
        keep_requests: bool = True,
    ) -> ScriptedServer:
        server = cls(deque(script), ssl_context, then or answer(), read_bodies=read_bodies, keep_requests=keep_requests)
        if sock is not None:
            server._server = await asyncio.start_server(server._serve, sock=sock, ssl=ssl_context)
        else:
            server._server = await asyncio.start_server(server._serve, "127.0.0.1", port, ssl=ssl_context)
        server.port = server._server.sockets[0].getsockname()[1]
        return server

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while (request := await read_request(reader, body=self.read_bodies)) is not None:
                if self.keep_requests:
                    self.requests.append(request)
                behaviour = self.script.popleft() if self.script else self.then
                if not await behaviour(self, request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.open -= 1  # counted as closed once the client could have seen it

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)


def refused_port() -> int:
    """A port that was just free: nothing listens there, so connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """A listening socket's accept queue as the kernel sees it, (queued, backlog), on Linux
    (TCP_INFO of a listener: tcpi_unacked is the queue's length, tcpi_sacked its cap); None elsewhere."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None or not sys.platform.startswith("linux"):
        return None
    values = struct.unpack_from("8B6I", sock.getsockopt(socket.IPPROTO_TCP, option, 104))
    return values[12], values[13]


class FullBacklog:
    """A listening socket that never accepts, its backlog filled: connecting hangs (a connect timeout).

    The kernel drops a SYN while the accept queue is full (Linux: ListenOverflows), and every
    retry of it too, for as long as nobody accepts: a connect times out whatever the timing of the
    SYN retries. The queue is known to be full from the kernel itself, not from a connect that
    seemed slow (which, on a loaded machine, can just be slow)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []

    async def fill(self) -> None:
        if accept_queue(self.sock) is None:
            await self._fill_until_a_connect_hangs()
            return
        loop = asyncio.get_running_loop()
        for _ in range(16):
            queued, backlog = accept_queue(self.sock)  # type: ignore[misc]
            if queued > backlog:
                return
            filler = socket.socket()
            filler.setblocking(False)
            self.fillers.append(filler)
            async with asyncio.timeout(5.0):  # the queue had room: this connect completes
                await loop.sock_connect(filler, ("127.0.0.1", self.port))
            # Its handshake's last ACK may still be on its way: wait until the queue counts it, or
            # is full (a handshake the kernel finished with a SYN cookie is dropped when full).
            count = len(self.fillers)
            deadline = loop.time() + 5.0
            while (queue := accept_queue(self.sock)) is not None and queue[0] < count and queue[0] <= queue[1]:
                if loop.time() > deadline:
                    raise AssertionError(f"the accept queue never counted connection {count}: {queue}")
                await asyncio.sleep(0.005)
        raise AssertionError("the backlog never filled")

    async def _fill_until_a_connect_hangs(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(16):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(filler, ("127.0.0.1", self.port)), 0.2)
            except (TimeoutError, OSError):
                filler.close()
                return  # this one hung: the queue is full
            self.fillers.append(filler)
        raise AssertionError("the backlog never filled")

    async def start_accepting(self) -> ScriptedServer:
        """From now on, a well-behaved server on the same socket."""
        for filler in self.fillers:
            filler.close()
        return await ScriptedServer.start(sock=self.sock)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()
