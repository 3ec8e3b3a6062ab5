"""Header policy of the proxy: what crosses a hop, and what the backend is told about the client."""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Iterable, Mapping

from aiohttp import web
from multidict import CIMultiDict

from lb_system.problems import REQUEST_ID_HEADER
from lb_system.upstream import HOP_BY_HOP, HeadFields

__all__ = ["HOP_BY_HOP", "HeaderPolicy", "response_headers", "strip_hop_by_hop", "without_hop_by_hop"]

# Dropped towards the backend besides hop-by-hop: aiohttp's server already answered "Expect".
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}
# A request naming none of these (lower case, as bytes) gets its head from its raw header lines
# as they came, plus the lines the proxy adds: nothing to drop, replace or append to. Whether
# the client is a trusted proxy then makes no difference: there is nothing of its to keep.
_EDITED = frozenset(
    name.encode()
    for name in (
        *_NOT_FORWARDED,
        "content-length",  # the transport writes the body's own
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        REQUEST_ID_HEADER.lower(),
    )
)
_IDEMPOTENCY_KEYS = (b"idempotency-key", b"x-idempotency-key")
_NAME = operator.itemgetter(0)


def strip_hop_by_hop(headers: CIMultiDict[str], drop: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """Delete, in place, the hop-by-hop names and those `Connection` lists; returns `headers`."""
    # Deleting the few names is 4-5x cheaper than filtering every header in Python.
    if "Connection" in headers:
        drop = drop | {
            token.strip().lower() for value in headers.getall("Connection") for token in value.split(",") if token.strip()
        }
    for name in drop:
        if name in headers:
            del headers[name]
    return headers


def without_hop_by_hop(headers: Mapping[str, str] | Iterable[tuple[str, str]], also_drop: frozenset[str]) -> CIMultiDict[str]:
    return strip_hop_by_hop(CIMultiDict(headers), also_drop)


def response_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """A copy of a backend's answer headers as the client gets them: hop-by-hop gone."""
    return without_hop_by_hop(headers, HOP_BY_HOP)


class HeaderPolicy:
    """Builds forwarded request headers; `X-Forwarded-*` from `trusted_proxies` are kept and appended to."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]

    def trusted(self, remote: str | None) -> bool:
        if not self.networks or not remote:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def upstream_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        """The headers the backend gets: hop-by-hop gone; X-Forwarded-*, Via and the request id added."""
        headers = without_hop_by_hop(request.headers, _NOT_FORWARDED)
        remote = request.remote or ""
        # The Host header itself: aiohttp's request.host falls back to socket.getfqdn() (a lookup on
        # the loop) for an HTTP/1.0 request without one; such a request gets no X-Forwarded-Host.
        host = request.headers.get("Host")
        if self.trusted(remote):
            prior = ", ".join(headers.getall("X-Forwarded-For", ()))
            headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
            headers.setdefault("X-Forwarded-Proto", request.scheme)
            if host is not None:
                headers.setdefault("X-Forwarded-Host", host)
        else:
            headers["X-Forwarded-For"] = remote
            headers["X-Forwarded-Proto"] = request.scheme
            if host is not None:
                headers["X-Forwarded-Host"] = host
            else:
                headers.popall("X-Forwarded-Host", None)
        via = headers.get("Via")
        headers["Via"] = f"{via}, 1.1 lb_system" if via else "1.1 lb_system"
        headers[REQUEST_ID_HEADER] = request_id
        return headers

    def upstream_head_fields(self, request: web.Request, request_id: str, host: str | None = None) -> HeadFields:
        """`upstream_headers`, with Host set to `host` when given, as the header lines of the
        backend's request head (`Endpoint.send`): the same lines in the same order. A request
        with no header to drop or edit (most) is serialized from its raw bytes, in C."""
        raw = request.raw_headers
        names = set(map(bytes.lower, map(_NAME, raw)))
        if host is not None or not _EDITED.isdisjoint(names):
            headers = self.upstream_headers(request, request_id)
            if host is not None:  # an absolute-form target names the host (RFC 9112 §3.2.2)
                headers["Host"] = host
            return HeadFields.from_pairs(headers.items())
        forwarded_host = request.headers.get("Host")
        added = (
            f"X-Forwarded-For: {request.remote or ''}\r\nX-Forwarded-Proto: {request.scheme}\r\n"
            + ("" if forwarded_host is None else f"X-Forwarded-Host: {forwarded_host}\r\n")
            + f"Via: 1.1 lb_system\r\n{REQUEST_ID_HEADER}: {request_id}\r\n"
        ).encode("utf-8", "surrogateescape")
        lines = len(raw) + (4 if forwarded_host is None else 5)
        data = b"%s\r\n%s" % (b"\r\n".join(map(b": ".join, raw)), added) if raw else added
        idempotency_key = _IDEMPOTENCY_KEYS[0] in names or _IDEMPOTENCY_KEYS[1] in names
        return HeadFields(data, lines, b"host" in names, True, idempotency_key)
