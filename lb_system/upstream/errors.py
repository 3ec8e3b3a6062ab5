"""What can go wrong in an exchange with a backend: one exception class per failure, raised where
it happens, as httpcore's `_exceptions.py`. Each class carries its `reason`, the word logs, the
access line's `tries=`, `/errors/stats` and the 502 bodies show; callers classify by type, never by
that string.

    UpstreamError
    ├── ConnectError            nothing reached the backend ("cannot connect")
    │   ├── ConnectionRefused   ("connection refused")
    │   └── ConnectTimeout      ("connect timeout")
    ├── ReadError               the connection broke before the answer ("connection reset")
    │   └── ServerDisconnected  closed cleanly before any answer ("server disconnected")
    ├── Timeout                 the try's time ran out, wherever it was spent ("timeout")
    │   └── PoolTimeout         no pooled connection came free: the balancer is busy, not the backend
    ├── ProtocolError           not HTTP, or HTTP out of step ("bad response")
    │   ├── HeadTooLarge        a head past a bound ("upstream response headers too large")
    │   │   └── TooManyInterim  past 10 interim 1xx answers ("too many interim responses")
    │   └── FramingTooLarge     a chunk-size line or trailers past it, mid-body
    └── BodyIncomplete          the answer started and was cut ("response body incomplete")
"""

from __future__ import annotations

# The reasons, shared with logs, metrics and the 502 bodies: spelled exactly like this.
CONNECTION_REFUSED = "connection refused"
CONNECTION_RESET = "connection reset"
CONNECT_TIMEOUT = "connect timeout"
TIMEOUT = "timeout"
BODY_INCOMPLETE = "response body incomplete"
BAD_RESPONSE = "bad response"
CANNOT_CONNECT = "cannot connect"
SERVER_DISCONNECTED = "server disconnected"
HEAD_TOO_LARGE = "upstream response headers too large"
TOO_MANY_INTERIM = "too many interim responses"
FRAMING_TOO_LARGE = "upstream chunk line or trailers too large"


class UpstreamError(Exception):
    """An exchange with a backend failed; `reason` names how (one of the words above)."""

    reason = CANNOT_CONNECT
    connecting = False  # no connection was made: nothing reached the backend

    def __init__(
        self, reason: str | None = None, *, sent: bool = False, answered: bool = False, connecting: bool | None = None
    ) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)
        if connecting is not None:
            self.connecting = connecting
        self.sent = sent  # some of the request was written: a retry may repeat a side effect
        self.answered = answered  # some of an answer arrived before it failed


class ConnectError(UpstreamError):
    """No connection could be made (no route, unknown host, a certificate that does not verify)."""

    connecting = True


class ConnectionRefused(ConnectError):
    reason = CONNECTION_REFUSED


class ConnectTimeout(ConnectError):
    """The backend did not take the connection within `connect_timeout`."""

    reason = CONNECT_TIMEOUT


class ReadError(UpstreamError):
    """The connection was reset (or written to after it broke) before the answer's head."""

    reason = CONNECTION_RESET


class ServerDisconnected(ReadError):
    """The backend closed the connection before any answer: a reused one it timed out, typically."""

    reason = SERVER_DISCONNECTED


class Timeout(UpstreamError):
    """The try's time ran out: waiting for the head, for the body, or for the caller's deadline."""

    reason = TIMEOUT


class PoolTimeout(Timeout):
    """No pooled connection came free in time: the balancer is busy, the backend is not to blame."""


class ProtocolError(UpstreamError):
    """The backend's bytes are not an HTTP/1.1 answer to this request."""

    reason = BAD_RESPONSE


class HeadTooLarge(ProtocolError):
    """The answer's head broke a bound (HeadLimits): refused before any of it reached the client."""

    reason = HEAD_TOO_LARGE


class TooManyInterim(HeadTooLarge):
    """More interim (1xx) answers than allowed before the final one."""

    reason = TOO_MANY_INTERIM


class FramingTooLarge(ProtocolError):
    """A chunk-size line (with its extensions) or the trailer section broke a bound, mid-body."""

    reason = FRAMING_TOO_LARGE


class BodyIncomplete(UpstreamError):
    """The answer's body ended before its length or its last chunk."""

    reason = BODY_INCOMPLETE
