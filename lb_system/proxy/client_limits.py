"""The balancer's side of each client connection: the limits aiohttp's server does not enforce,
and refusals answered as problem+json and reported instead of aiohttp's plain-text 400.

What it hooks, and why: aiohttp parses requests in `web_protocol.RequestHandler`, before any
middleware runs, so a client that never finishes its headers or body, or that sends what the
parser refuses, never reaches our handlers. `ClientConnection` subclasses it and is installed
by `ClientLimitsRunner` (an AppRunner whose `web.Server` makes `ClientConnection`s):

- `data_received` counts each header section against `max_header_section_bytes` (431) and times
  it against `header_timeout` (408); then it watches the request body: `body_timeout` between
  two reads, `request_timeout` for the whole upload (a 408 raised where the handler reads the
  body). A timer starts only when a head or body did not arrive whole in one read, and one per
  message at most: the usual request costs no timer at all.
- `handle_error` (aiohttp's public answer to what its parser refused: smuggling attempts, bad
  methods, oversized lines; and to the refusals queued here) answers problem+json and reports
  the refusal to `on_refusal`.

The private names of aiohttp this needs are in proxy/aiohttp_hooks.py, each wrapped once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidHeader, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from lb_system.balancing.events import BALANCER
from lb_system.config import ProxyConfig
from lb_system.problems import ANSWERED_BY_HEADER, REQUEST_ID_HEADER, new_request_id, problem_response
from lb_system.proxy.aiohttp_hooks import ProtocolRunner, QueuedRefusal, queued_refusal
from lb_system.proxy.targets import CANNOT_FORWARD, forwardable_form
from lb_system.proxy.websocket import ClientBytes


class Refusal(NamedTuple):
    """A request the balancer refused before routing it."""

    status: int
    reason: str  # a short word for the access line: "header_timeout", "bad_method", ...
    detail: str  # safe to show the client: never its own bytes
    client: str
    request_id: str


AppHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Given the app's own handler, the handler every request goes to.
Front = Callable[[AppHandler], AppHandler]


@dataclass(frozen=True)
class ClientLimits:
    """What a ClientConnection needs: the [proxy] settings (read once per connection) and where refusals go."""

    settings: Callable[[], ProxyConfig]
    on_refusal: Callable[[Refusal], None]
    # When set, every request goes to front(app_handler) instead of straight to the app:
    # it may answer without aiohttp's router and middleware chain, or hand over to app_handler.
    front: Front | None = None


CLIENT_LIMITS = web.AppKey("client_limits", ClientLimits)
# How long a refused client may go on sending before its connection is closed under it.
LINGER_S = 2.0


class ClientTimedOut(web.HTTPRequestTimeout):
    """Raised where the handler reads a request body the client stopped sending; answered 408."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(text=detail)
        self.refusal_reason = reason


class _Refused(Exception):
    """A refusal decided here (not by the parser), queued and answered as the parser's are."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


def _parser_refusal(exc: BaseException) -> tuple[int, str, str]:
    """(status, reason, detail) for an error of aiohttp's parser; the detail never quotes the client."""
    if isinstance(exc, _Refused):
        return exc.status, exc.reason, exc.detail
    if isinstance(exc, LineTooLong):
        return 431, "line_too_long", "Request line or header field too long"
    if isinstance(exc, BadHttpMethod):
        return 400, "bad_method", "Invalid HTTP method"
    if isinstance(exc, BadStatusLine):
        return 400, "bad_request_line", "Invalid request line"
    if isinstance(exc, InvalidHeader):
        return 400, "bad_header", "Invalid header field"
    return 400, "malformed", "Malformed HTTP request"


def _head_size(message: RawRequestMessage) -> int:
    """Bytes of a parsed header section, near enough (only computed near the cap)."""
    return len(message.method) + len(message.path) + 12 + sum(len(k) + len(v) + 4 for k, v in message.raw_headers)


class ClientConnection(RequestHandler):
    """One client connection of the balancer, with header/body limits and reported refusals."""

    __slots__ = (
        "_limits",
        "_header_timeout",
        "_body_timeout",
        "_request_timeout",
        "_max_head",
        "_head_bytes",
        "_head_timer",
        "_body",
        "_body_timer",
        "_body_last",
        "_body_deadline",
        "_refused",
        "_gone",
    )

    def __init__(self, manager: web.Server, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        proxy = limits.settings()
        self._limits = limits
        self._header_timeout = proxy.header_timeout
        self._body_timeout = proxy.body_timeout
        self._request_timeout = proxy.request_timeout
        self._max_head = proxy.max_header_section_bytes
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_last = 0.0
        self._body_deadline = 0.0
        self._refused = False
        self._gone: asyncio.Future[None] | None = None

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's own signature
        # A tunnel's client that sends no more may still read: keep the connection open for writing.
        parser = self._payload_parser
        if self._upgraded and isinstance(parser, ClientBytes):
            return parser.half_close()
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._upgraded or self._payload_parser is not None:
            if not self._refused:
                super().data_received(data)
            return
        body = self._body
        if body is not None:
            if not body.is_eof():
                self._body_last = self._loop.time()
                super().data_received(data)
                return
            self._body = None
        before = self._request_count
        self._head_bytes += len(data)
        super().data_received(data)
        if self._request_count == before:  # the header section is still incomplete
            if self._head_bytes > self._max_head:
                self._refuse(431, "header_section_too_large", "Request header section too large")
            # Only with a partial head pending: aiohttp also calls this with b"" to reparse its buffer.
            elif self._head_bytes and self._head_timer is None and not (self._close or self._force_close):
                self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        over, self._head_bytes = self._head_bytes > self._max_head, 0
        if not self._messages:
            return
        message, payload = self._messages[-1]
        if not isinstance(message, RawRequestMessage):
            self._refuse_more()  # the parser refused it (answered by handle_error): read no more
            return
        if message.path[:1] != "/":  # rare: not origin-form
            if not forwardable_form(message.method, message.path):
                # Authority-form (CONNECT), asterisk-form, or a scheme we do not speak: never routed.
                self._messages[-1] = (self._err_info(400, "bad_target", CANNOT_FORWARD), EMPTY_PAYLOAD)
                self._refuse_more()
                return
            if not message.url.relative().path:  # "http://host": its path is "/" (RFC 9112 §3.2.2)
                self._messages[-1] = (message._replace(url=message.url.with_path("/", keep_query=True)), payload)
        if over and _head_size(message) > self._max_head:
            # Still queued: answered as a refusal instead of being handled.
            refusal = self._err_info(431, "header_section_too_large", "Request header section too large")
            self._messages[-1] = (refusal, EMPTY_PAYLOAD)
            self._refuse_more()
        elif payload is not EMPTY_PAYLOAD and not payload.is_eof():
            now = self._loop.time()
            self._body, self._body_last, self._body_deadline = payload, now, now + self._request_timeout
            if self._body_timer is None:
                self._body_timer = self._loop.call_at(min(now + self._body_timeout, self._body_deadline), self._check_body)

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._body = None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not (self._refused or self._close or self._force_close):
            self._refuse(408, "header_timeout", "Request header section not received in time")

    def _check_body(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self._force_close:
            return
        now = self._loop.time()
        if self._reading_paused:
            self._body_last = now  # we stopped reading (the body waits for the backend): the client is not late
        elif now - self._body_last >= self._body_timeout:
            self._body_timed_out(body, "body_timeout", "Request body stalled: nothing received for too long")
            return
        elif now >= self._body_deadline:
            self._body_timed_out(body, "request_timeout", "Request body not received within the request timeout")
            return
        due = self._body_last + self._body_timeout
        self._body_timer = self._loop.call_at(due if self._reading_paused else min(due, self._body_deadline), self._check_body)

    def _body_timed_out(self, body: StreamReader, reason: str, detail: str) -> None:
        self._body = None
        self._refuse_more()  # nothing more is read from this client
        if self._current_request is None:  # the answer went out already: just close
            self.force_close()
            return
        body.set_exception(ClientTimedOut(reason, detail))
        body.feed_eof()  # no lingering read after the answer
        self.close()  # the connection closes once the 408 is written

    def _refuse_more(self) -> None:
        """Read nothing more from this client, and close lingering after the refusal's answer.
        The connection becomes a _RefusedConnection (same slots, its finish_response lingers): every
        other request is spared the coroutine level an override checking the flag would add."""
        self._refused = True
        self.__class__ = _RefusedConnection

    def _err_info(self, status: int, reason: str, detail: str) -> QueuedRefusal:
        return queued_refusal(status, _Refused(status, reason, detail), detail)

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Queue an answer to a request refused while its header section arrives; read no more."""
        self._refuse_more()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._request_count += 1
        self._messages.append((self._err_info(status, reason, detail), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A refused request (the parser's 400s, our queued refusals) answered as problem+json and
        reported; anything else (a handler's 500 or 504) as aiohttp answers it."""
        if not (isinstance(exc, _Refused) or (status == 400 and isinstance(exc, HttpProcessingError))):
            return super().handle_error(request, status, exc, message)
        status, reason, detail = _parser_refusal(exc)
        request_id = new_request_id()
        self._limits.on_refusal(Refusal(status, reason, detail, request.remote or "-", request_id))
        response = problem_response(
            status,
            detail,
            instance=None,
            request_id=request_id,
            headers={ANSWERED_BY_HEADER: BALANCER, REQUEST_ID_HEADER: request_id},
        )
        response.force_close()
        return response

    async def _linger(self) -> None:
        """Half-close, and read (discarding) until the client closes or LINGER_S pass: closing
        at once, with its bytes still arriving, would reset the connection, and the client could
        lose the answer it had not read yet."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return
        transport.write_eof()
        self._gone = self._loop.create_future()
        try:
            async with asyncio.timeout(LINGER_S):
                await self._gone
        except TimeoutError:
            pass


class _RefusedConnection(ClientConnection):
    """A ClientConnection that refused its client (see `_refuse_more`)."""

    __slots__ = ()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, then a lingering close."""
        result = await super().finish_response(request, resp, start_time)
        await self._linger()
        return result


class _Server(web.Server):
    """aiohttp's low-level server, making ClientConnections."""

    def __init__(
        self,
        handler: AppHandler,
        plain: web.Server,
        limits: ClientLimits,
        loop: asyncio.AbstractEventLoop,
        settings: dict[str, Any],
    ) -> None:
        super().__init__(
            handler, request_factory=plain.request_factory, handler_cancellation=plain.handler_cancellation, loop=loop, **settings
        )
        self.limits, self.loop, self.settings = limits, loop, settings

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, self.limits, loop=self.loop, **self.settings)


class ClientLimitsRunner(ProtocolRunner):
    """An AppRunner for the balancer app: its connections are ClientConnections, with the
    limits the app set under CLIENT_LIMITS."""

    def make_server(self, plain: web.Server, settings: dict[str, Any], loop: asyncio.AbstractEventLoop) -> web.Server:
        limits = self.app[CLIENT_LIMITS]
        handler: AppHandler = plain.request_handler
        if limits.front is not None:
            handler = limits.front(handler)
        # The same server aiohttp built (handler, request factory, handler_args), another protocol.
        return _Server(handler, plain, limits, loop, settings)
