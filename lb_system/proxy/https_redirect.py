"""`[balancer] redirect_http_port`: a plain-HTTP listener that sends every request to HTTPS."""

from __future__ import annotations

import re

from aiohttp import web
from yarl import URL

from lb_system.problems import new_request_id, problem_response

# A DNS name, an IPv4 address or an IPv6 one (as yarl gives it: lower case, no brackets).
_HOST = re.compile(r"[a-z0-9.-]+|[0-9a-f:.]+")


def https_location(request: web.BaseRequest, https_port: int) -> URL:
    """The same host, path and query on HTTPS; the port left out when it is 443. ValueError for a
    Host that is not one."""
    host = request.headers.get("Host", "")
    name = URL(f"//{host}").raw_host if host else None
    if not name or not _HOST.fullmatch(name):
        raise ValueError("no host")
    authority = URL.build(scheme="https", host=name, port=None if https_port == 443 else https_port)
    # The target as the client wrote it: its path and query unchanged, byte for byte.
    target = request.raw_path if request.raw_path.startswith("/") else request.rel_url.raw_path_qs
    return URL(str(authority) + target, encoded=True)


def make_redirect_app(https_port: int) -> web.Application:
    """Answers every method and path with a 308 (the method and body are kept) to `https_port`."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        try:
            location = https_location(request, https_port)
        except ValueError:
            return problem_response(400, "A valid Host header is needed", instance=request.path, request_id=new_request_id())
        return web.Response(status=308, headers={"Location": str(location)})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", redirect)
    return app
