"""The balancer application: its own endpoints, and everything else handed to the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .admin import AdminControl, add_admin_routes, make_admin_middleware
from .backend_pool import BackendPool
from .config import Config
from .error_tracker import ErrorTracker
from .health import HealthChecker
from .keys import ADMIN_CONTROL, BACKEND_POOL, CLIENT_SESSION, ERROR_TRACKER, FORWARDER, HEALTH_CHECKER
from .problems import CATCH_ALL_VARIABLE, make_problem_middleware
from .proxy import Forwarder
from .transport import make_client_session

BALANCER = "balancer"


def _json(data: object) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    pool = request.app[BACKEND_POOL]
    return _json(
        {"status": pool.health_word(), "healthy_backends": pool.healthy_count, "total_backends": len(pool.backends)}
    )


async def status(request: web.Request) -> web.Response:
    pool = request.app[BACKEND_POOL]
    control = request.app.get(ADMIN_CONTROL)
    return _json(
        {
            "strategy": pool.strategy.name,
            "healthy": pool.healthy_count,
            "total": len(pool.backends),
            "backends": [backend.status_dict() for backend in pool.backends],
            # Removed by a reload, finishing their in-flight requests.
            "retiring": [backend.status_dict() for backend in pool.retiring],
            "config_error": control.config_error if control is not None else None,
        }
    )


def _positive_int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 1_000_000:
        raise web.HTTPBadRequest(text=f"Invalid query parameter '{name}': must be a positive integer, got {raw!r}")
    return int(raw)


async def error_stats(request: web.Request) -> web.Response:
    server = request.query.get("server")
    if server is not None and not server:
        raise web.HTTPBadRequest(text="Invalid query parameter 'server': must not be empty")
    status_filter = _positive_int_query(request, "status")
    if status_filter is not None and not 400 <= status_filter <= 599:
        raise web.HTTPBadRequest(text=f"Invalid query parameter 'status': must be 400-599, got {status_filter}")
    limit = _positive_int_query(request, "limit")
    return _json(request.app[ERROR_TRACKER].stats(server=server, status=status_filter, limit=limit))


# The balancer's own paths: a wrong method there is the balancer's 405, never forwarded.
OWN_ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET", "HEAD"),
    "/status": ("GET", "HEAD"),
    "/errors/stats": ("GET", "HEAD", "DELETE"),
}


def make_balancer_app(
    config: Config,
    *,
    pool: BackendPool,
    tracker: ErrorTracker,
    logger: logging.Logger,
    control: AdminControl | None = None,
) -> web.Application:
    """The balancer. Its cleanup context owns the shared client session and the health checker:
    every backend has had one check before the app is ready to accept a request. With a
    `control` (the System) it also serves the admin API."""
    middlewares = [make_problem_middleware(server=BALANCER, tracker=tracker, logger=logger)]
    if control is not None:
        middlewares.append(make_admin_middleware(logger))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=config.proxy.max_body_bytes or 2**63,
        handler_args={"max_field_size": config.proxy.max_header_bytes, "max_line_size": config.proxy.max_header_bytes},
    )
    app[BACKEND_POOL] = pool
    app[ERROR_TRACKER] = tracker

    forwarder = Forwarder(pool, lambda: app[CLIENT_SESSION], config, logger=logger)
    app[FORWARDER] = forwarder

    async def forward(request: web.Request) -> web.StreamResponse:
        allowed = OWN_ROUTES.get(request.path)
        if allowed is not None:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        return await forwarder(request)

    async def client_and_health(app: web.Application) -> AsyncIterator[None]:
        session = make_client_session(config.proxy)
        app[CLIENT_SESSION] = session
        checker = HealthChecker(pool, session, logger=logger)
        app[HEALTH_CHECKER] = checker
        task = None
        try:
            await checker.check_once()
            task = asyncio.create_task(checker.run(), name="health-checker")
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await session.close()

    async def name_the_answerer(request: web.Request, response: web.StreamResponse) -> None:
        # Forwarded answers already name their backend; everything else the balancer answered itself.
        response.headers.setdefault("X-Backend", BALANCER)

    app.on_response_prepare.append(name_the_answerer)
    app.cleanup_ctx.append(client_and_health)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/errors/stats", error_stats)
    if control is not None:
        add_admin_routes(app, control)
    app.router.add_route("*", "/" + CATCH_ALL_VARIABLE.replace("}", ":.*}"), forward)
    return app
