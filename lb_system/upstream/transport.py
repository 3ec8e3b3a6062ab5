"""The upstream transport: keep-alive HTTP/1.1 connections to the backends, one `Endpoint`
per backend, plus connections of their own for health checks and upgrade tunnels.

    transport = Transport.from_config(config.proxy)
    response = await transport.endpoint("http://127.0.0.1:5001").request("GET", "/tasks/1", headers)
    try:
        body = await response.read()
    finally:
        response.release()
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from urllib.parse import urlsplit

from lb_system.config import ProxyConfig
from lb_system.upstream.errors import (
    ConnectError,
    ConnectionRefused,
    ConnectTimeout,
    PoolTimeout,
    ReadError,
    Timeout,
    UpstreamError,
)
from lb_system.upstream.http11 import (
    ConnectionState,
    Exchange,
    HeadFields,
    HeadLimits,
    RequestHead,
    UpstreamConnection,
    build_head,
)

__all__ = ["Endpoint", "TunnelLimitReached", "Transport", "split_url"]

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def split_url(url: str) -> tuple[str, str]:
    """A URL as its origin (scheme://host:port, which names the Endpoint) and the rest, sent as the
    target: `http://h:1/api?q=1` is ("http://h:1", "/api?q=1")."""
    parts = urlsplit(url)
    rest = parts.path + ("?" + parts.query if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", rest


class TunnelLimitReached(Exception):
    """The backend already has `max_tunnels_per_backend` open tunnels: answer 503, try later."""


def _should_retry(head: RequestHead, error: UpstreamError, reused: bool, replayable: bool) -> bool:
    """Go's net/http (transport.go, `persistConn.shouldRetryRequest`): only a reused connection
    may have been closed by the backend under our feet. Retry when no byte of an answer came and
    either nothing was written or the request is idempotent (GET, HEAD, OPTIONS, TRACE, or an
    Idempotency-Key header), and the body can be sent again."""
    if not reused or error.answered or not replayable or not isinstance(error, ReadError):
        return False
    return not error.sent or head.method in _IDEMPOTENT or head.idempotency_key


def _expire_wait(waiter: asyncio.Future[UpstreamConnection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(PoolTimeout())


class _Dedicated:
    """Owner of an endpoint's connections outside the cap: tunnels (never reused),
    or health checks, which keep one connection alive from one check to the next (`keep`)."""

    def __init__(self, endpoint: Endpoint, *, keep: bool) -> None:
        self.endpoint, self.keep = endpoint, keep
        self.open = 0
        self.idle: UpstreamConnection | None = None

    def take(self) -> UpstreamConnection | None:
        """The kept connection, unless it is gone or was idle past `upstream_idle_timeout`."""
        connection, self.idle = self.idle, None
        if connection is None:
            return None
        connection.state = ConnectionState.ACTIVE
        if connection.usable and connection.loop.time() - connection.idle_since < self.endpoint._transport.idle_timeout:
            return connection
        connection.close()
        return None

    def drop(self) -> None:
        """Close the kept connection (its endpoint is retired)."""
        if self.idle is not None:
            self.idle.close()

    def connection_reusable(self, connection: UpstreamConnection) -> None:
        endpoint = self.endpoint
        if not self.keep or self.idle is not None or endpoint._closed or endpoint._retired:
            connection.close()
            return
        connection.state = ConnectionState.IDLE
        connection.idle_since = connection.loop.time()
        self.idle = connection

    def connection_closed(self, connection: UpstreamConnection, idle: bool) -> None:
        self.open -= 1
        if self.idle is connection:
            self.idle = None
        self.endpoint._connections.discard(connection)


class Endpoint:
    """One backend's connections: capped keep-alive ones (idle between requests, a FIFO wait when
    all are busy), and dedicated ones outside the cap (health checks, tunnels)."""

    def __init__(self, transport: Transport, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default_port
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = shown if self.port == default_port else f"{shown}:{self.port}"
        self._ssl = transport.ssl_context() if parts.scheme == "https" else None
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = 0  # capped connections: idle, busy or connecting
        self._idle: deque[UpstreamConnection] = deque()  # most recently used on the right
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: set[UpstreamConnection] = set()
        self._dedicated = _Dedicated(self, keep=True)
        self._tunnels = _Dedicated(self, keep=False)
        self._closed = False
        self._retired = False  # no backend has this address any more: connections close once idle

    # --- what callers use -----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] | HeadFields = (),
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        body_length: int | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
        read_timeout: float | None = None,
        dedicated: bool = False,
        deadline: float | None = None,
    ) -> Exchange:
        """Send one request and return the answer once its head arrived (1xx skipped).

        `target` is sent as given (origin-form); `headers` are (name, value) pairs, or their lines
        built beforehand (`HeadFields`: a proxy builds them once for every try), Host added when
        missing; a streamed `body` goes chunked unless `body_length` is given. `wait_timeout` bounds
        the wait for a capped connection, `timeout` the wait for the answer's head, `read_timeout`
        each wait inside the body. `dedicated` uses a connection of its own, outside the cap
        (health checks). `deadline` (loop time) bounds all of it up to the answer's head, a timer
        per stage instead of a timeout scope around the call. Raises UpstreamError ("timeout" past
        the deadline)."""
        streamed = body is not None and not isinstance(body, bytes)
        length = len(body) if isinstance(body, bytes) else body_length
        head = build_head(method, target, headers, self.host_header, body_length=length, streamed=streamed)
        if dedicated:
            connection = self._dedicated.take() or await self._connect_dedicated(self._dedicated, deadline)
        else:
            left = self._left(wait_timeout, deadline)  # past the deadline: a timeout, nothing taken
            # An idle connection is taken here, without the coroutine of a wait or a connect.
            connection = self._take_idle() or await self._acquire(left, deadline=deadline)
        try:
            head_wait = self._left(timeout, deadline)
            response = connection.start(head, body, length, read_timeout)
            await response.head_arrived(head_wait)
            return response
        except UpstreamError as error:
            if not _should_retry(head, error, connection.reused, replayable=not streamed):
                raise
        if dedicated:
            connection = await self._connect_dedicated(self._dedicated, deadline)
        else:
            connection = await self._acquire(self._left(wait_timeout, deadline), fresh=True, deadline=deadline)
        return await connection.exchange(head, body, length, timeout=self._left(timeout, deadline), read_timeout=read_timeout)

    def _left(self, timeout: float | None, deadline: float | None) -> float | None:
        """The shorter of `timeout` and the time left until `deadline`; past it, a timeout now."""
        if deadline is None:
            return timeout
        left = deadline - self._get_loop().time()
        if left <= 0:
            raise Timeout
        return left if timeout is None or timeout > left else timeout

    async def open_tunnel(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        timeout: float | None = None,
    ) -> Exchange:
        """Send an upgrade request (WebSocket) on a connection outside the cap. A 101 answer's
        `detach()` gives the Tunnel; any other answer is read and released as usual. Raises
        TunnelLimitReached past `max_tunnels_per_backend`, UpstreamError when the backend fails."""
        if self._tunnels.open >= self._transport.max_tunnels_per_backend:
            raise TunnelLimitReached(self.url)
        head = build_head(method, target, headers, self.host_header, body_length=None, streamed=False)
        connection = await self._connect_dedicated(self._tunnels)
        return await connection.exchange(head, None, None, timeout=timeout, read_timeout=timeout)

    @property
    def open_connections(self) -> int:
        """Pooled connections: idle, busy or being opened."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a capped connection (read on every request: O(1); a waiter whose
        wait just ran out counts until its task runs, a moment later)."""
        return len(self._waiters)

    @property
    def open_tunnels(self) -> int:
        return self._tunnels.open

    @property
    def connections(self) -> int:
        """Every open connection: capped, dedicated and tunnels."""
        return len(self._connections)

    def retire(self) -> None:
        """No backend has this address any more (a moved one's old address): idle connections close
        now, busy ones as their exchange ends; a tunnel lasts as long as its session."""
        self._retired = True
        self._dedicated.drop()
        while self._idle:
            self._idle[0].close()  # out of the idle ones as it closes (connection_closed)

    async def close(self) -> None:
        """Close every connection, busy ones too; later requests fail with "cannot connect"."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError())
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        if connections:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in connections], timeout=1.0)

    # --- the capped connections: idle ones, waiters, connects -------------------------------------

    def _take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still open, if any."""
        if self._closed:
            return None
        idle = self._idle
        while idle:
            connection = idle.pop()
            connection.state = ConnectionState.ACTIVE  # taken from the idle ones for an exchange
            if connection.usable:
                return connection
            connection.abort()  # the backend closed it while it sat here: never written to
        return None

    async def _acquire(
        self, wait_timeout: float | None, *, fresh: bool = False, deadline: float | None = None
    ) -> UpstreamConnection:
        while True:
            if self._closed:
                raise ConnectError()
            if not fresh and (connection := self._take_idle()) is not None:
                return connection
            if self._open < self._transport.max_connections_per_backend and not self._waiters:
                self._open += 1
                return await self._connect_counted(deadline)
            handed = await self._wait(wait_timeout)
            if handed is None:
                return await self._connect_counted(deadline)
            if handed.usable:
                return handed
            handed.abort()

    async def _wait(self, wait_timeout: float | None) -> UpstreamConnection | None:
        """Queue for the next connection given back (or the slot of one closed: None)."""
        loop = self._get_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(wait_timeout, _expire_wait, waiter) if wait_timeout is not None else None
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand_on(waiter.result())  # handed over just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _hand_on(self, connection: UpstreamConnection | None) -> None:
        if connection is None:
            self._slot_free()
        else:
            self.connection_reusable(connection)

    def _hand_to_waiter(self, handed: UpstreamConnection | None) -> bool:
        """Give a connection (or, as None, a free slot) to the longest waiting request, if any."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return True
        return False

    def _slot_free(self) -> None:
        if not self._hand_to_waiter(None):
            self._open -= 1

    async def _connect_counted(self, deadline: float | None) -> UpstreamConnection:
        try:
            return await self._connect(self, deadline)
        except BaseException:
            self._slot_free()
            raise

    async def _connect_dedicated(self, owner: _Dedicated, deadline: float | None = None) -> UpstreamConnection:
        owner.open += 1
        try:
            return await self._connect(owner, deadline)
        except BaseException:
            owner.open -= 1
            raise

    async def _connect(self, owner: Endpoint | _Dedicated, deadline: float | None = None) -> UpstreamConnection:
        if self._closed:
            raise ConnectError()
        loop = self._get_loop()
        connection = UpstreamConnection(loop, owner, self._transport.head_limits)
        limit = loop.time() + self._transport.connect_timeout
        try:
            async with asyncio.timeout_at(limit if deadline is None or deadline > limit else deadline):
                await loop.create_connection(
                    lambda: connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            # The caller's deadline came first: its timeout, not the backend's slow connect.
            if deadline is not None and deadline <= limit:
                raise Timeout(connecting=True) from None
            raise ConnectTimeout from None
        except ConnectionRefusedError:
            raise ConnectionRefused from None
        except OSError:  # no route, unknown host, a certificate that does not verify
            raise ConnectError() from None
        self._connections.add(connection)
        return connection

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- ConnectionOwner, for capped connections -------------------------------------------------

    def connection_reusable(self, connection: UpstreamConnection) -> None:
        if self._closed:
            connection.close()
            return
        if self._waiters and self._hand_to_waiter(connection):
            return
        if self._retired:
            connection.close()
            return
        loop = self._get_loop()
        connection.idle_since = loop.time()
        connection.state = ConnectionState.IDLE
        self._idle.append(connection)
        if self._sweeper is None:  # none armed means none was idle: this one is the oldest
            self._sweeper = loop.call_at(connection.idle_since + self._transport.idle_timeout, self._sweep)

    def connection_closed(self, connection: UpstreamConnection, idle: bool) -> None:
        self._connections.discard(connection)
        if idle:
            self._idle.remove(connection)
        self._slot_free()

    def _sweep(self) -> None:
        """Close connections idle for `upstream_idle_timeout`, oldest first."""
        self._sweeper = None
        idle, timeout = self._idle, self._transport.idle_timeout
        loop = self._get_loop()
        expired = loop.time() - timeout
        while idle and idle[0].idle_since <= expired:
            idle[0].close()  # out of the idle ones as it closes (connection_closed)
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + timeout, self._sweep)


class Transport:
    """Connections to every backend, one Endpoint per backend URL (scheme, host and port)."""

    def __init__(
        self,
        *,
        max_connections_per_backend: int = 100,
        max_tunnels_per_backend: int = 1000,
        connect_timeout: float = 1.0,
        idle_timeout: float = 30.0,
        ca_file: str | None = None,
        head_limits: HeadLimits | None = None,
    ) -> None:
        self.max_connections_per_backend = max_connections_per_backend
        self.head_limits = head_limits or HeadLimits()
        self.max_tunnels_per_backend = max_tunnels_per_backend
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._endpoints: dict[str, Endpoint] = {}
        self._retired: list[Endpoint] = []  # retired endpoints that may still have busy connections
        if ca_file:
            self.ssl_context()  # a CA file that cannot be read fails at start-up, not on the first request

    @classmethod
    def from_config(cls, proxy: ProxyConfig) -> Transport:
        """A transport with the `[proxy]` section's caps and timeouts."""
        return cls(
            max_connections_per_backend=proxy.max_connections_per_backend,
            max_tunnels_per_backend=proxy.max_tunnels_per_backend,
            connect_timeout=proxy.connect_timeout,
            idle_timeout=proxy.upstream_idle_timeout,
            ca_file=proxy.ca_file,
            head_limits=HeadLimits(proxy.max_response_header_bytes, proxy.max_response_headers),
        )

    def apply_config(self, proxy: ProxyConfig) -> None:
        """The keys that apply live (the caps and `ca_file` need a restart)."""
        self.connect_timeout = proxy.connect_timeout

    def ssl_context(self) -> ssl.SSLContext:
        """For https backends: the system's CAs plus `ca_file`, certificates and host names verified."""
        if self._ssl is None:
            context = ssl.create_default_context()
            if self.ca_file:
                context.load_verify_locations(cafile=self.ca_file)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    def endpoint(self, url: str) -> Endpoint:
        """The backend at `url` (scheme://host:port; a path is ignored)."""
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = Endpoint(self, url)
        return endpoint

    def has_endpoint(self, url: str) -> bool:
        """Whether connections to `url` are kept (its backend is, or was until it drained)."""
        return url in self._endpoints

    def retire(self, url: str) -> None:
        """A moved backend's old address: forgotten at once (a request to it gets a new Endpoint),
        its connections closed as they come idle, and at the latest by `close()`."""
        endpoint = self._endpoints.pop(url, None)
        if endpoint is not None:
            self._retired = [e for e in self._retired if e.connections]
            self._retired.append(endpoint)
            endpoint.retire()

    async def discard(self, url: str) -> None:
        """Forget a removed backend, closing its connections."""
        endpoint = self._endpoints.pop(url, None)
        if endpoint is not None:
            await endpoint.close()

    async def close(self) -> None:
        """Close every connection to every backend."""
        endpoints = [*self._endpoints.values(), *self._retired]
        self._endpoints.clear()
        self._retired.clear()
        await asyncio.gather(*(endpoint.close() for endpoint in endpoints))
