"""The upstream transport: lb_system's HTTP/1.1 client to the backends, on asyncio protocols and
llhttp. It knows nothing of aiohttp or of balancing policy (import contracts in pyproject.toml):
the proxy drives it, the way an app drives httpcore.

- `transport.py`: one `Endpoint` per backend (its capped keep-alive connections, idle between
  requests, and dedicated ones for checks and tunnels) and `Transport`, the endpoints by URL;
- `http11.py`: one connection as an asyncio protocol (its state: NEW, ACTIVE, IDLE, CLOSED), an
  `Exchange` (one request and its answer, parsed by llhttp), the tunnel;
- `flow.py`: the one flow control, both ways, for the answer's body, a tunnel and an upload;
- `errors.py`: one exception class per failure, each with the reason users see;
- `probe.py`: a health check's GET, on a kept-alive connection of its own, its body read up to a bound.
"""

from lb_system.upstream.errors import (
    BAD_RESPONSE,
    BODY_INCOMPLETE,
    CANNOT_CONNECT,
    CONNECT_TIMEOUT,
    CONNECTION_REFUSED,
    CONNECTION_RESET,
    FRAMING_TOO_LARGE,
    HEAD_TOO_LARGE,
    SERVER_DISCONNECTED,
    TIMEOUT,
    TOO_MANY_INTERIM,
    BodyIncomplete,
    ConnectError,
    ConnectionRefused,
    ConnectTimeout,
    FramingTooLarge,
    HeadTooLarge,
    PoolTimeout,
    ProtocolError,
    ReadError,
    ServerDisconnected,
    Timeout,
    TooManyInterim,
    UpstreamError,
)
from lb_system.upstream.http11 import HOP_BY_HOP, ConnectionState, Exchange, HeadFields, HeadLimits, Tunnel
from lb_system.upstream.probe import Probe, ProbeAnswer, transport_probe
from lb_system.upstream.transport import Endpoint, Transport, TunnelLimitReached, split_url

__all__ = [
    "BAD_RESPONSE",
    "BODY_INCOMPLETE",
    "CANNOT_CONNECT",
    "CONNECTION_REFUSED",
    "CONNECTION_RESET",
    "CONNECT_TIMEOUT",
    "FRAMING_TOO_LARGE",
    "HEAD_TOO_LARGE",
    "HOP_BY_HOP",
    "SERVER_DISCONNECTED",
    "TIMEOUT",
    "TOO_MANY_INTERIM",
    "BodyIncomplete",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionRefused",
    "ConnectionState",
    "Endpoint",
    "Exchange",
    "Probe",
    "ProbeAnswer",
    "FramingTooLarge",
    "HeadFields",
    "HeadLimits",
    "HeadTooLarge",
    "PoolTimeout",
    "ProtocolError",
    "ReadError",
    "ServerDisconnected",
    "Timeout",
    "TooManyInterim",
    "Tunnel",
    "TunnelLimitReached",
    "UpstreamError",
    "Transport",
    "split_url",
    "transport_probe",
]
