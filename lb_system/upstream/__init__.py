"""The upstream transport: lb_system's HTTP/1.1 client to the backends, on asyncio protocols and
llhttp. It knows nothing of aiohttp or of balancing policy (import contracts in pyproject.toml):
the proxy drives it, the way an app drives httpcore.

- `transport.py`: one `Endpoint` per backend (its keep-alive pool, dedicated and tunnel
  connections) and `UpstreamPool`, the endpoints by URL;
- `http11.py`: one connection as an asyncio protocol, the answer parsed by llhttp, the tunnel.
"""

from lb_system.upstream.transport import (
    BAD_RESPONSE,
    BODY_INCOMPLETE,
    CANNOT_CONNECT,
    CONNECT_TIMEOUT,
    CONNECTION_REFUSED,
    CONNECTION_RESET,
    SERVER_DISCONNECTED,
    TIMEOUT,
    Endpoint,
    PoolTimeout,
    Tunnel,
    TunnelLimitReached,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    split_url,
)

__all__ = [
    "BAD_RESPONSE",
    "BODY_INCOMPLETE",
    "CANNOT_CONNECT",
    "CONNECTION_REFUSED",
    "CONNECTION_RESET",
    "CONNECT_TIMEOUT",
    "SERVER_DISCONNECTED",
    "TIMEOUT",
    "Endpoint",
    "PoolTimeout",
    "Tunnel",
    "TunnelLimitReached",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "split_url",
]
