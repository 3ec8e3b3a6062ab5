"""How bytes reach the backends: the one shared client session, and names for what went wrong."""

from __future__ import annotations

import asyncio
import errno

import aiohttp

from lb_system.config import ProxyConfig

# A proxy passes headers and bodies through: nothing added, nothing decoded, no cookies kept.
_SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def make_client_session(proxy: ProxyConfig) -> aiohttp.ClientSession:
    """The keep-alive pool used for every forwarded request (health checks have their own)."""
    connector = aiohttp.TCPConnector(
        limit=0,  # the per-backend cap below is the one that matters
        limit_per_host=proxy.max_connections_per_backend,
        keepalive_timeout=30.0,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIPPED_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=proxy.connect_timeout),
        raise_for_status=False,
    )


def describe_failure(error: BaseException) -> str:
    """A short, client-safe reason for a failed exchange with a backend."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return "connect timeout"
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        code = error.os_error.errno if error.os_error else None
        if code == errno.ECONNREFUSED or "refused" in str(error).lower():
            return "connection refused"
        return "cannot connect"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "response body incomplete"
    if isinstance(error, (aiohttp.ClientOSError, ConnectionResetError)):
        return "connection reset"
    if isinstance(error, aiohttp.ClientResponseError):
        return f"bad response ({error.status})"
    return type(error).__name__


def is_connect_failure(error: BaseException) -> bool:
    """True when nothing was sent: safe to retry any method."""
    return isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
