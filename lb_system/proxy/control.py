"""The balancer's own endpoints, wherever they are served (the traffic port, or the control
listener of `[control] port`): the read token of `[control] read_token_env`, and every error
answer counted as the balancer's, in `lb_requests_total` as in `lb_errors_total`."""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable

from aiohttp import BasicAuth, web
from aiohttp.typedefs import Middleware

from lb_system.balancing.events import BALANCER, Observer, ProxiedRequest
from lb_system.config import Config
from lb_system.problems import NOT_AN_ERROR, Handler

READ_CHALLENGE = 'Basic realm="lb_system"'
# Uptime probes reach it without a token, as they would any server's health page.
OPEN_PATHS = frozenset({"/health"})


def presented_token(authorization: str) -> str | None:
    """The token in `Authorization: Bearer <token>`, or the password of HTTP Basic (what a browser sends)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            password: str = BasicAuth.decode(authorization).password
        except ValueError:
            return None
        return password
    return None


def read_allowed(config: Config, authorization: str) -> bool:
    """Whether a request may read the control endpoints: no read token is set, or it presents
    the read token (or the admin token, which may do more)."""
    name = config.control.read_token_env
    if name is None:
        return True
    given = presented_token(authorization)
    if given is None:
        return False
    tokens = [os.environ.get(name, ""), os.environ.get(config.admin.token_env, "")]
    # Constant-time, and both compared: how long it takes tells nothing of either token.
    matches = [bool(token) and hmac.compare_digest(given.encode(), token.encode()) for token in tokens]
    return any(matches)


def make_own_endpoint_middleware(
    config: Callable[[], Config], observers: Observer, *, forwarded: Callable[[web.Request], bool]
) -> Middleware:
    """For every request to the balancer's own endpoints (not `forwarded` ones): a 401 asking for
    the read token where one is set (`/health` stays open), and each error answer reported to the
    observers as the balancer's, as proxied requests are."""

    @web.middleware
    async def own_endpoint(request: web.Request, handler: Handler) -> web.StreamResponse:
        if forwarded(request):
            return await handler(request)
        started = time.perf_counter()
        status = 500
        try:
            if request.path not in OPEN_PATHS and not read_allowed(config(), request.headers.get("Authorization", "")):
                raise web.HTTPUnauthorized(
                    text="This endpoint needs the control token: send `Authorization: Bearer <token>`, "
                    "or HTTP Basic with the token as the password",
                    headers={"WWW-Authenticate": READ_CHALLENGE},
                )
            response = await handler(request)
            # An answer marked not an error (the /health 503) is counted by its handler.
            status = 0 if response.get(NOT_AN_ERROR) else response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            if status >= 400:
                duration = time.perf_counter() - started
                observers.on_request(
                    ProxiedRequest(method=request.method, status=status, backend=BALANCER, duration_s=duration, tries=())
                )

    return own_endpoint
