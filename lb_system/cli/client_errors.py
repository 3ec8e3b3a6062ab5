"""Names for what went wrong in a request the command line's clients (the demo, the failover
rehearsal) make with aiohttp's client; the balancer's upstream transport names its own failures."""

from __future__ import annotations

import asyncio
import errno

import aiohttp


def describe_failure(error: BaseException) -> str:
    """A short reason for a failed request, as the demo prints it."""
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
