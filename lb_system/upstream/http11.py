"""One HTTP/1.1 connection to a backend as an asyncio protocol: the request written by us, the
answer parsed by llhttp (httptools), bodies streamed both ways with flow control.

Shaped like uvicorn's `protocols/http/httptools_impl.py`, seen from the client side: one protocol
per connection, one exchange at a time, one FlowControl for both ways. Its state is one field, as
httpcore's `HTTPConnectionState`: NEW, ACTIVE (carrying an exchange or a tunnel), IDLE (in its
owner's idle connections, reusable), CLOSED. An exchange's `state` is what it leaves its connection in.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import NoReturn, Protocol

import httptools

from lb_system.upstream.errors import (
    BodyIncomplete,
    FramingTooLarge,
    HeadTooLarge,
    ProtocolError,
    ReadError,
    ServerDisconnected,
    Timeout,
    TooManyInterim,
    UpstreamError,
)
from lb_system.upstream.flow import FlowControl

_NO_BODY_STATUS = frozenset({204, 304})
# Header names the head builder looks at; every other header is passed as given.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_NOTICED = _FRAMING | {"host", "connection", "idempotency-key", "x-idempotency-key"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Hop-by-hop header names (RFC 9110 §7.6.1), lower case; an answer's are noted as parsed, the
# name's length a first sieve.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
_NOTED_SIZES = frozenset({len(name) for name in _HOP_BY_HOP} | {len(b"content-length")})
# A head's bytes besides its fields, counted against HeadLimits.max_bytes: "HTTP/1.1 200 ", two CRLFs.
_HEAD_FRAMING = 17


class HeadLimits:
    """Bounds on what a backend sends outside a body, as nginx's `proxy_buffer_size` and Envoy's
    `max_response_headers_kb` / `max_headers_count`: the status line and header section in bytes
    and fields, the interim (1xx) answers before the final one, and, after the head, each
    chunk-size line (with its extensions) and the trailer section, in the same bytes and fields."""

    __slots__ = ("max_bytes", "max_fields", "max_interim")

    def __init__(self, max_bytes: int = 65536, max_fields: int = 100, max_interim: int = 10) -> None:
        self.max_bytes, self.max_fields, self.max_interim = max_bytes, max_fields, max_interim


class _Broken(Exception):
    """Raised inside a parser callback to stop llhttp at once; the error is kept on the response."""


class ConnectionState(enum.Enum):
    """A connection's state (httpcore's HTTPConnectionState): the one answer to "may it be reused"."""

    NEW = "new"  # connected, has carried nothing yet
    ACTIVE = "active"  # carrying an exchange (or a tunnel), or handed to one
    IDLE = "idle"  # between exchanges, among its owner's idle connections: reusable
    CLOSED = "closed"  # closed, or to be closed once its exchange is released


class ConnectionOwner(Protocol):
    """Who is told when a connection is done with an exchange or closed: its endpoint, for the
    capped ones, or a dedicated slot."""

    def connection_reusable(self, connection: UpstreamConnection) -> None: ...

    def connection_closed(self, connection: UpstreamConnection, idle: bool) -> None: ...


class RequestHead:
    """A request line and headers ready to write, plus what the transport needs to know about them."""

    __slots__ = ("data", "idempotency_key", "keep_alive", "method")

    def __init__(self, data: bytes, method: str, keep_alive: bool, idempotency_key: bool) -> None:
        self.data, self.method, self.keep_alive, self.idempotency_key = data, method, keep_alive, idempotency_key


class HeadFields:
    """A request's header lines as they go on the wire ("Name: value\r\n" each), built once and
    sent on every try; the head adds Host when missing and the body's framing."""

    __slots__ = ("data", "has_host", "idempotency_key", "keep_alive", "lines")

    def __init__(self, data: bytes, lines: int, has_host: bool, keep_alive: bool = True, idempotency_key: bool = False) -> None:
        # `data` holds no Content-Length nor Transfer-Encoding: the transport owns the framing.
        self.data, self.lines = data, lines
        self.has_host, self.keep_alive, self.idempotency_key = has_host, keep_alive, idempotency_key

    @classmethod
    def from_pairs(cls, headers: Iterable[tuple[str, str]]) -> HeadFields:
        """From (name, value) pairs: the caller's Content-Length and Transfer-Encoding dropped."""
        lines = []
        keep_alive = True
        has_host = idempotency_key = False
        for name, value in headers:
            lower = name.lower()
            if lower in _NOTICED:
                if lower in _FRAMING:
                    continue
                if lower == "host":
                    has_host = True
                elif lower == "connection":
                    keep_alive = "close" not in value.lower()
                else:
                    idempotency_key = True
            lines.append(f"{name}: {value}\r\n")
        data = "".join(lines).encode("utf-8", "surrogateescape")
        return cls(data, len(lines), has_host=has_host, keep_alive=keep_alive, idempotency_key=idempotency_key)


def build_head(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] | HeadFields,
    host: str,
    *,
    body_length: int | None,
    streamed: bool,
) -> RequestHead:
    """Serialize a request head. The transport owns the framing: the caller's Content-Length and
    Transfer-Encoding are replaced by the body's own; Host is added when missing."""
    fields = headers if isinstance(headers, HeadFields) else HeadFields.from_pairs(headers)
    host_line = b"" if fields.has_host else b"Host: %s\r\n" % host.encode("utf-8", "surrogateescape")
    if body_length is not None:
        framing = b"Content-Length: %d\r\n" % body_length
    elif streamed:
        framing = b"Transfer-Encoding: chunked\r\n"
    elif method in _BODY_METHODS:
        framing = b"Content-Length: 0\r\n"
    else:
        framing = b""
    # The request line, the fields, Host, the framing, the empty line.
    lines = fields.lines + 2 + (not fields.has_host) + (framing != b"")
    data = b"%s %s HTTP/1.1\r\n%s%s%s\r\n" % (
        method.encode("utf-8", "surrogateescape"),
        target.encode("utf-8", "surrogateescape"),
        fields.data,
        host_line,
        framing,
    )
    # Every line ends in a CRLF put there on purpose: any other CR or LF would smuggle a header.
    if data.count(b"\n") != lines or data.count(b"\r") != lines:
        raise ValueError("CR or LF inside a request line or header")
    return RequestHead(data, method, fields.keep_alive, fields.idempotency_key)


def shorter_wait(loop: asyncio.AbstractEventLoop, timeout: float | None, deadline: float | None) -> float | None:
    """The shorter of `timeout` and the time left until `deadline` (loop time); None for no bound."""
    if deadline is None:
        return timeout
    left = deadline - loop.time()
    return left if timeout is None else min(timeout, left)


class Exchange:
    """One request and the backend's answer: the head at once, the body read with
    `read_chunk`/`read` or by iterating.

    Call `release()` when done (or use `async with`). `state` is what the exchange leaves its
    connection in: ACTIVE while it runs, IDLE once the answer arrived whole and both sides keep
    the connection alive, CLOSED once anything rules reuse out (a failure, `Connection: close`,
    an upgrade, bytes out of step, an upload left unsent). Released IDLE, the connection goes back
    among its endpoint's idle connections; otherwise it is closed.
    """

    def __init__(self, connection: UpstreamConnection, head: RequestHead, read_timeout: float | None, limits: HeadLimits) -> None:
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.headers: list[tuple[str, str]] = []  # (name, value) as received, in order
        self.has_body = False  # False for HEAD, 1xx, 204, 304 and a Content-Length of 0
        self.content_length: int | None = None
        self.chunked = False
        self.hop_by_hop = False  # the answer's head names a hop-by-hop header (Connection among them)
        self.read_timeout = read_timeout  # the longest wait for the next piece of the body
        self._connection = connection
        self._request = head
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._raw: list[tuple[str, str]] = []
        self._limits = limits
        # Counted against `limits`: the current head's (or, after the final head, the trailers')
        # bytes and fields so far, the interim answers, and the bytes fed since the parser last
        # finished a piece (a field, a chunk line, body bytes): a line that never ends grows it.
        self._section = _HEAD_FRAMING
        self._fields = 0
        self._interim = 0
        self._unparsed = 0
        self._broken: type[ProtocolError] | None = None
        # The current head's first Transfer-Encoding, Content-Length and Connection values, noted as parsed.
        self._encoding: bytes | None = None
        self._length: bytes | None = None
        self._connection_value: bytes | None = None
        self._head_waiter: asyncio.Future[None] = connection.loop.create_future()
        self.state = ConnectionState.ACTIVE
        self._final = False  # the final (non-1xx) head arrived
        self._complete = False  # the body arrived whole (or the head, for an answer without one)
        self._answered = False
        self._sent = False
        self._error: BaseException | None = None
        self._chunks: deque[bytes] = deque()
        self._flow = connection.flow
        self._waiter: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._upgraded: bytearray | None = None
        self._released = False

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of the header `name` (any case), or `default`."""
        size, lower = len(name), name.lower()
        for key, value in self.headers:
            if len(key) == size and key.lower() == lower:
                return value
        return default

    def _connection_header_keeps_alive(self) -> bool:
        """RFC 9112 §9.3: HTTP/1.1 persists unless `Connection: close`; HTTP/1.0 only with `keep-alive`."""
        tokens = {token.strip().lower() for token in (self._connection_value or b"").split(b",")}
        return b"keep-alive" in tokens if self.version == "1.0" else b"close" not in tokens

    @property
    def close_delimited(self) -> bool:
        """The body ends when the backend closes the connection."""
        return self.has_body and not self.chunked and self.content_length is None

    # --- llhttp callbacks (httptools calls them by these names) -------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._section += len(reason)
        if self._section > self._limits.max_bytes:
            self._break(HeadTooLarge)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._unparsed = 0
        self._fields += 1
        size = len(name)
        self._section += size + len(value) + 4  # ": " and CRLF
        if self._fields > self._limits.max_fields or self._section > self._limits.max_bytes:
            self._break(FramingTooLarge if self._final else HeadTooLarge)
        if not self._final:  # trailers are counted, not kept
            self._raw.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
            if size in _NOTED_SIZES:  # a cheap first sieve: most names are none of these
                self._note(name.lower(), value)

    def _note(self, name: bytes, value: bytes) -> None:
        """Keep what the head's end needs (the first value, as `header()` gives it), and whether a
        hop-by-hop header came (the forwarder strips them only then)."""
        if name == b"content-length":
            if self._length is None:
                self._length = value
        elif name in _HOP_BY_HOP:
            self.hop_by_hop = True
            if name == b"transfer-encoding":
                if self._encoding is None:
                    self._encoding = value
            elif name == b"connection" and self._connection_value is None:
                self._connection_value = value

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        if self._complete:  # a second answer to one request: this connection is out of step
            self.state = ConnectionState.CLOSED
            return
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints: not the answer
            self._interim += 1
            if self._interim > self._limits.max_interim:
                self._break(TooManyInterim)
            self._raw, self._reason = [], b""
            self._section, self._fields = _HEAD_FRAMING, 0
            self._length = self._encoding = self._connection_value = None
            self.hop_by_hop = False
            return
        self._final = True
        self._section = self._fields = 0  # the trailers, if any, are bounded on their own
        self.status = status
        self.reason = self._reason.decode("latin-1")
        self.version = parser.get_http_version()
        self.headers = self._raw
        method = self._request.method
        if status == 101 or status in _NO_BODY_STATUS or method == "HEAD":
            if method == "HEAD":
                # llhttp cannot be told this answered a HEAD: the exchange ends here, and the
                # parser (one per exchange) is dropped before it would wait for a body. Nor can
                # it tell whether the connection lives on when the head has no length (it would
                # wait for a body ended by a close): the Connection header and version say.
                self._ended(self._connection_header_keeps_alive())
        elif self._encoding is not None:
            self.chunked = self._encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            self.has_body = True
        else:
            length = self._length
            self.content_length = int(length) if length is not None else None  # llhttp checked it
            self.has_body = self.content_length != 0
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def on_body(self, data: bytes) -> None:
        self._unparsed = 0
        if self._complete:  # bytes after a HEAD answer: this connection is out of step
            self.state = ConnectionState.CLOSED
            return
        self._chunks.append(data)
        self._flow.received(len(data))
        self._wake()

    def on_chunk_header(self) -> None:
        self._unparsed = 0

    def on_chunk_complete(self) -> None:
        self._unparsed = 0

    def on_message_complete(self) -> None:
        self._unparsed = 0
        if not self._final or self._complete:
            return
        self._ended()
        self._wake()

    def _ended(self, keep_alive: bool | None = None) -> None:
        """The answer arrived whole: the connection may carry another, unless either side said no."""
        self._complete = True
        if self.state is ConnectionState.ACTIVE:
            keep = (self._parser.should_keep_alive() if keep_alive is None else keep_alive) and self._request.keep_alive
            self.state = ConnectionState.IDLE if keep else ConnectionState.CLOSED

    # --- fed by the connection ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._answered = True
        if self._upgraded is not None:
            self._upgraded += data
            return
        if self._complete:  # more than the answer: fine for this one, but no reuse
            self.state = ConnectionState.CLOSED
            return
        # While the head is unfinished llhttp and httptools keep a line whole, however long: the
        # parser is fed no more than the bound leaves room for, so nothing past it is ever held.
        while not self._final and len(data) > (room := max(self._limits.max_bytes - self._section - self._unparsed, 0)):
            interim = self._interim
            parsed = self._parse(data[:room])
            data = data[room:]
            if self._upgraded is not None:  # a 101 within the room: the rest is the tunnel's
                self._upgraded += data
                return
            if not parsed:
                return
            if not self._final and self._interim == interim:  # no head ended within the room
                self._fail(HeadTooLarge(sent=True, answered=True))
                return
        if self._complete:
            if data:  # more than the answer: fine for this one, but no reuse
                self.state = ConnectionState.CLOSED
            return
        if self._parse(data) and self._unparsed + self._section > self._limits.max_bytes and not self._complete:
            # A line still unfinished past the bound, read by read: a chunk-size line (llhttp
            # parses it in place) or a trailer (httptools keeps its value).
            self._fail((FramingTooLarge if self._final else HeadTooLarge)(sent=True, answered=True))

    def _parse(self, data: bytes) -> bool:
        """Feed the parser; False when the exchange ended in error or became a tunnel."""
        self._unparsed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded = bytearray(data[upgrade.args[0] :])
            self.state = ConnectionState.CLOSED  # it carries a tunnel now, never another exchange
            self._flow.pause_reading()  # until the tunnel is taken
            return False
        except httptools.HttpParserError:
            if self._broken is not None:
                self._fail(self._broken(sent=True, answered=True))
            elif self._complete:
                self.state = ConnectionState.CLOSED
            else:
                self._fail(ProtocolError(sent=True, answered=True))
            return False
        return True

    def _break(self, error: type[ProtocolError]) -> NoReturn:
        self._broken = error
        raise _Broken(error.reason)

    def _lost(self, error: BaseException | None) -> None:
        if self._error is not None or self._complete or self._released:
            return  # an upgraded exchange is complete: its tunnel learns of the loss
        if self._final:
            if error is None and self.close_delimited:
                self._complete = True
                self.state = ConnectionState.CLOSED
                self._wake()
                return
            failure: type[UpstreamError] = BodyIncomplete
        else:
            failure = ServerDisconnected if error is None else ReadError
        self._fail(failure(sent=self._sent, answered=self._answered))

    def _fail(self, error: BaseException) -> None:
        """The exchange is over and the connection with it; readers get `error`."""
        self.state = ConnectionState.CLOSED
        if self._error is None:
            self._error = error
            if not self._head_waiter.done():
                self._head_waiter.set_exception(error)
                self._head_waiter.exception()  # retrieved here: nobody may be waiting any more
            self._wake()
        self._connection.abort()

    def _body_sent(self, sender: asyncio.Task[None]) -> None:
        if sender.cancelled() or self._released:
            return
        error = sender.exception()
        if error is not None:
            # The body's source failed (the client left, or sent too much): the caller learns that,
            # not a made-up backend failure.
            self._fail(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the caller's side ----------------------------------------------------------------------

    async def head_arrived(self, timeout: float | None) -> None:
        """Wait for the answer's head (1xx skipped), `timeout` at most; on failure the exchange is
        released and the error raised. The one coroutine of the wait: no `_wait_for` beneath it."""
        waiter = self._head_waiter
        connection = self._connection
        if timeout is not None:
            connection.time(waiter, timeout)
        try:
            await waiter
        except BaseException as error:
            failure = self._wait_failed(error)
            self.release()
            raise failure from None
        finally:
            connection.timed = None
        if self._error is not None:  # the head came with a broken rest (a 101 that is no upgrade)
            self.release()
            raise self._error

    async def _wait_for(self, waiter: asyncio.Future[None], timeout: float | None) -> None:
        connection = self._connection
        if timeout is not None:
            connection.time(waiter, timeout)
        try:
            await waiter
        except BaseException as error:
            raise self._wait_failed(error) from None
        finally:
            connection.timed = None

    def _wait_failed(self, error: BaseException) -> BaseException:
        """A wait ended in `error` (its timer's TimeoutError, a failure, a cancellation): the
        exchange fails with it; returns what the waiter raises."""
        if isinstance(error, TimeoutError):
            self._fail(Timeout(sent=self._sent, answered=self._answered))
            return self._error  # type: ignore[return-value]
        self._fail(self._error or Timeout(sent=self._sent, answered=self._answered))
        return error

    async def read_chunk(self, deadline: float | None = None) -> bytes:
        """The next piece of the body (all that is buffered); b"" once it is read whole. A wait
        lasts `read_timeout` at most, and ends at `deadline` (loop time) when one is given."""
        while True:
            if self._chunks:
                return self._take_buffered()
            if self._error is not None:
                raise self._error
            if self._complete or self._released:
                return b""
            loop = self._connection.loop
            self._waiter = loop.create_future()
            try:
                await self._wait_for(self._waiter, shorter_wait(loop, self.read_timeout, deadline))
            finally:
                self._waiter = None

    def body_arrived(self) -> bytes | None:
        """The whole body when all of it already arrived (what `read()` would return, without its
        coroutine and its waits); None when some is still to come: then `read()`."""
        if not self._complete or self._error is not None or self._released:
            return None
        return self._take_buffered()

    def _take_buffered(self) -> bytes:
        """Everything of the body buffered so far, as one bytes; reading from the backend may resume."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._flow.consumed()
        return data

    async def read(self, deadline: float | None = None) -> bytes:
        """The whole body (for small ones), by `deadline` (loop time) when one is given."""
        parts = []
        while chunk := await self.read_chunk(deadline):
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def detach(self) -> Tunnel:
        """After a 101 answer: the connection, as a raw byte tunnel, now the caller's to close."""
        if self._upgraded is None or self._released:
            raise RuntimeError("only an unreleased 101 answer has a tunnel")
        self._released = True
        return self._connection.become_tunnel(bytes(self._upgraded))

    def release(self) -> None:
        """Done with this answer: the connection is kept (idle) only when it can carry another."""
        if self._released:
            return
        self._released = True
        sender = self._sender
        if sender is not None:
            if not sender.done():
                sender.cancel()
                self.state = ConnectionState.CLOSED  # an upload cut short: the backend waits for the rest
            elif sender.cancelled() or sender.exception() is not None:
                self.state = ConnectionState.CLOSED
        self._flow.consumed()  # a body left unread: the connection must read again to be of any use
        self._connection.exchange_done(self.state is ConnectionState.IDLE)
        # Nothing feeds this answer any more. The parser holds its bound callbacks: a reference
        # cycle per request that only the garbage collector would free (its young-generation
        # passes took some 5% of the CPU under load); dropping the parser frees it at once.
        del self._parser


class Tunnel:
    """The backend's side of an upgraded connection (WebSocket or other): raw bytes both ways."""

    def __init__(self, connection: UpstreamConnection, initial: bytes) -> None:
        self._connection = connection
        self._chunks: deque[bytes] = deque([initial] if initial else [])
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        # The connection stopped reading at the 101: it reads on unless the first bytes are many.
        self._flow = flow = connection.flow
        flow.consumed()
        flow.received(len(initial))

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._flow.received(len(data))
        self._wake()

    def _lost(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """What the backend sent since the last read; b"" once it closed."""
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._flow.consumed()
        return data

    def write(self, data: bytes) -> None:
        """Send bytes to the backend; await `drain()` now and then."""
        self._connection.write(data)

    def write_eof(self) -> None:
        """Nothing more goes to the backend (a FIN after what was written), while what it sends is
        still read: a half-close, as a TCP proxy passes one on. Closes when it cannot (TLS)."""
        transport = self._connection.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        else:
            self.close()

    async def drain(self) -> None:
        """Wait until the backend takes what was written."""
        await self._flow.drain()

    @property
    def writing_paused(self) -> bool:
        """The backend is slow to take what was written: `drain()` would wait."""
        return self._flow.write_paused

    @property
    def closed(self) -> bool:
        return self._connection.closed

    def close(self) -> None:
        """Close the backend's side of the tunnel; the tunnel slot is freed."""
        self._connection.close()


class UpstreamConnection(asyncio.Protocol):
    """One connection to a backend. Its owner (its endpoint) is told when it can be reused or is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: ConnectionOwner, limits: HeadLimits) -> None:
        self.loop = loop
        self.owner = owner
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.state = ConnectionState.NEW  # CLOSED once closed by us or by the backend; the owner was told
        self.reused = False  # has carried an exchange before
        self.idle_since = 0.0
        self.flow = FlowControl()
        self._exchange: Exchange | None = None
        self._tunnel: Tunnel | None = None
        self._lost = False  # connection_lost ran
        self._closed_waiter: asyncio.Future[None] | None = None
        # The one timed wait of its exchange at a time (`time`): its future and when it expires,
        # watched by a timer armed no later than that, and re-armed only when it fires early. A
        # wait that ends leaves the timer be: one timer per `timeout`, not one per wait.
        self.timed: asyncio.Future[None] | None = None
        self._expires = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.connection_made(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is not None:
            exchange._feed(data)
        elif self._tunnel is not None:
            self._tunnel._feed(data)
        else:  # bytes nobody asked for on an idle connection: it cannot be trusted with a request
            self.abort()

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:  # the backend sends no more; the other way may go on
            self._tunnel._lost()
            return True
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._exchange is not None:
            self._exchange._lost(exc)
        if self._tunnel is not None:
            self._tunnel._lost()
        self.flow.connection_lost()
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self._gone_now()

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # --- used by the endpoint and the exchange ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    @property
    def usable(self) -> bool:
        """Open and idle: checked before a request is written, so a connection the backend closed
        while it sat idle costs nothing."""
        transport = self.transport
        return self.state is not ConnectionState.CLOSED and transport is not None and not transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.state is ConnectionState.CLOSED or self.transport is None:
            raise ReadError(sent=True)
        self.transport.write(data)

    async def exchange(
        self,
        head: RequestHead,
        body: bytes | AsyncIterable[bytes] | None,
        body_length: int | None,
        *,
        timeout: float | None,
        read_timeout: float | None,
    ) -> Exchange:
        """Write one request and wait for the answer's head (1xx skipped); `timeout` bounds that wait."""
        response = self.start(head, body, body_length, read_timeout)
        await response.head_arrived(timeout)
        return response

    def start(
        self, head: RequestHead, body: bytes | AsyncIterable[bytes] | None, body_length: int | None, read_timeout: float | None
    ) -> Exchange:
        """Write one request; the answer's head is then awaited with `head_arrived`."""
        response = Exchange(self, head, read_timeout, self.limits)
        self.state = ConnectionState.ACTIVE
        self._exchange = response
        transport = self.transport
        assert transport is not None
        response._sent = True
        if isinstance(body, bytes):
            if len(body) <= 65536:
                transport.write(head.data + body)
            else:
                transport.writelines((head.data, body))
        else:
            transport.write(head.data)
            if body is not None:
                response._sender = sender = self.loop.create_task(self._send_body(body, body_length))
                sender.add_done_callback(response._body_sent)
        return response

    async def _send_body(self, body: AsyncIterable[bytes], length: int | None) -> None:
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            if self._lost:
                return  # the answer's reader learns why
            sent += len(chunk)
            if length is None:
                self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # type: ignore[union-attr]
            elif sent > length:
                raise ValueError(f"request body longer than its Content-Length {length}")
            else:
                self.transport.write(chunk)  # type: ignore[union-attr]
            await self.flow.drain()
        if self._lost:
            return
        if length is None:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        elif sent != length:
            raise ValueError(f"request body of {sent} bytes, Content-Length said {length}")

    def exchange_done(self, reusable: bool) -> None:
        self._exchange = None
        if reusable and self.usable:
            self.reused = True
            self.owner.connection_reusable(self)
        else:
            self.abort()

    def become_tunnel(self, initial: bytes) -> Tunnel:
        self._exchange = None
        self._tunnel = tunnel = Tunnel(self, initial)
        if self._lost:
            tunnel._lost()
        return tunnel

    def close(self) -> None:
        """Close gracefully (an idle or tunnel connection): written bytes are still sent."""
        if self.transport is not None:
            self.transport.close()
        self._gone_now()

    def abort(self) -> None:
        """Close at once, dropping anything unsent (a broken or half-read connection)."""
        if self.transport is not None:
            self.transport.abort()
        self._gone_now()

    async def wait_closed(self) -> None:
        if self._lost or self.transport is None:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self.loop.create_future()
        await asyncio.shield(self._closed_waiter)

    def time(self, waiter: asyncio.Future[None], timeout: float) -> None:
        """Fail `waiter` with TimeoutError unless it is done within `timeout`, or `timed` is reset."""
        loop = self.loop
        expires = loop.time() + timeout
        self.timed, self._expires = waiter, expires
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > expires:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(expires, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        waiter = self.timed
        if waiter is None or waiter.done():
            return
        if self.loop.time() >= self._expires:
            self.timed = None
            waiter.set_exception(TimeoutError())
        else:  # a wait begun since the timer was armed: it expires later
            self._watchdog = self.loop.call_at(self._expires, self._watch)

    def _gone_now(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.state is not ConnectionState.CLOSED:
            idle, self.state = self.state is ConnectionState.IDLE, ConnectionState.CLOSED
            self.owner.connection_closed(self, idle)
