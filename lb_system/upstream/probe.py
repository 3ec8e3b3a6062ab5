"""A health check's GET over the transport: on a connection of its own per backend, outside the
capped pool, with a bounded read of the body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lb_system.config import CHECK_BODY_LIMIT
from lb_system.upstream.transport import Transport, split_url

__all__ = ["Probe", "ProbeAnswer", "transport_probe"]


@dataclass(frozen=True)
class ProbeAnswer:
    """A check's answer: its status and the start of its body (at most CHECK_BODY_LIMIT bytes)."""

    status: int
    body: bytes


# GET `url` within `timeout` seconds, with `host` as the Host header when given; raises on any
# failure to get an answer.
Probe = Callable[[str, float, str | None], Awaitable[ProbeAnswer]]


def transport_probe(upstream: Transport) -> Probe:
    """A probe over the upstream transport, on a connection of its own outside the pool, kept
    alive from one check to the next (one per backend); redirects are not followed. At most CHECK_BODY_LIMIT
    bytes of the body are read: a longer one ends the check's connection there."""

    async def probe(url: str, timeout: float, host: str | None) -> ProbeAnswer:
        origin, target = split_url(url)
        headers = [("Host", host)] if host is not None else []
        async with asyncio.timeout(timeout):
            response = await upstream.endpoint(origin).request("GET", target or "/", headers, dedicated=True)
            try:
                body = bytearray()
                while len(body) < CHECK_BODY_LIMIT and (chunk := await response.read_chunk()):
                    body += chunk
            finally:
                response.release()
        return ProbeAnswer(response.status, bytes(body[:CHECK_BODY_LIMIT]))

    return probe
