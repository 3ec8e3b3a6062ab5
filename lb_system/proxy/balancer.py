"""The balancer application: its own endpoints, and everything else handed to the forwarder."""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lb_system.balancing.events import BALANCER
from lb_system.balancing.pool import BackendPool
from lb_system.balancing.pools import Pools
from lb_system.config import Config
from lb_system.observability.dashboard import dashboard_snapshot, make_page_handler
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.live import LiveFeed
from lb_system.observability.metrics import CONTENT_TYPE, Metrics
from lb_system.observability.request_stats import RequestStats
from lb_system.observability.status import instance_identity, status_document
from lb_system.problems import (
    ANSWERED_BY_HEADER,
    CATCH_ALL_VARIABLE,
    NOT_AN_ERROR,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    ProblemMiddleware,
    RouteGroups,
    json_response,
    new_request_id,
)
from lb_system.proxy.admin import ADMIN_CONTROL, AdminControl, guarded, make_admin_app, reset_error_stats
from lb_system.proxy.aiohttp_hooks import set_match_info
from lb_system.proxy.client_limits import CLIENT_LIMITS, AppHandler, ClientLimits, Refusal
from lb_system.proxy.control import make_own_endpoint_middleware
from lb_system.proxy.forwarder import Forwarder
from lb_system.proxy.health import HealthChecker
from lb_system.proxy.openapi import balancer_document
from lb_system.proxy.targets import OwnPaths
from lb_system.upstream import Transport, transport_probe

# The balancer app's state, set once by make_balancer_app (the checker by its cleanup context).
BACKEND_POOLS = web.AppKey("backend_pools", Pools)
ERROR_TRACKER = web.AppKey("error_tracker", ErrorTracker)
FORWARDER = web.AppKey("forwarder", Forwarder)
HEALTH_CHECKER = web.AppKey("health_checker", HealthChecker)
METRICS = web.AppKey("metrics", Metrics)
REQUEST_STATS = web.AppKey("request_stats", RequestStats)
LIVE_FEED = web.AppKey("live_feed", LiveFeed)


async def health(request: web.Request) -> web.Response:
    # Probes and outer balancers read the status code: 503 exactly when no request could be served.
    started = time.perf_counter()
    pools = request.app[BACKEND_POOLS]
    word = pools.health_word()
    body: dict[str, object] = _health_counts(pools, word)
    if pools.routed:
        body["pools"] = {pool.name: _health_counts(pool, pool.health_word()) for pool in pools}
    if word != "unavailable":
        return json_response(body)
    response = json_response(body, status=503)
    # The 503 is the probe's answer, not the balancer's error: counted as a request, never
    # recorded in /errors/stats (a probe polling every second would fill the recent errors).
    response[NOT_AN_ERROR] = True
    request.app[METRICS].count_own_answer(request.method, 503, time.perf_counter() - started)
    return response


def _health_counts(pool: Pools | BackendPool, word: str) -> dict[str, object]:
    return {
        "status": word,
        "serving_backends": pool.serving_count,
        "healthy_backends": pool.healthy_count,
        "total_backends": len(pool.backends),
    }


async def status(request: web.Request) -> web.Response:
    control = request.app.get(ADMIN_CONTROL)
    return json_response(
        status_document(
            request.app[BACKEND_POOLS],
            request.app[REQUEST_STATS],
            config_error=control.config_error if control is not None else None,
        )
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


async def events(request: web.Request) -> web.StreamResponse:
    # Streamed: the headers the problem middleware adds to other answers are set here.
    headers = {ANSWERED_BY_HEADER: BALANCER, REQUEST_ID_HEADER: request[REQUEST_ID]}
    return await request.app[LIVE_FEED].handle(request, headers)


def _positive_int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or not 0 < int(raw) < 1_000_000:
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
    stats = request.app[ERROR_TRACKER].stats(server=server, status=status_filter, limit=limit)
    return json_response(stats | {"instance": instance_identity()})


def handshake_refusal(client: str, error: OSError) -> Refusal:
    """A failed TLS handshake as the balancer's refusal: plain HTTP sent to the HTTPS port, a
    hello it cannot take, or none in time. The detail is OpenSSL's name for it, never client bytes."""
    if isinstance(error, ssl.SSLError):
        reason = error.reason or "unknown"
        if reason == "HTTP_REQUEST":
            return Refusal(400, "tls_plain_http", "Plain HTTP sent to the HTTPS port", client, new_request_id())
        return Refusal(400, "tls_handshake", f"TLS handshake failed: {reason}", client, new_request_id())
    return Refusal(408, "tls_handshake_timeout", "TLS handshake not finished in time", client, new_request_id())


@dataclass(frozen=True)
class Balancer:
    """The balancer app and what its owner may do with it: nothing outside reads the app's keys.
    With `[control] port` set, the balancer's own endpoints are in `control_app`, and `app`
    forwards every path."""

    app: web.Application
    forwarder: Forwarder
    live_feed: LiveFeed
    control_app: web.Application | None
    refused: Callable[[Refusal], None]

    def handshake_failed(self, client: str, error: OSError) -> None:
        """A TLS handshake that failed on one of the balancer's listeners: recorded as its refusal."""
        self.refused(handshake_refusal(client, error))

    @property
    def health_checker(self) -> HealthChecker:
        """The active health checker; it exists once the app has started."""
        return self.app[HEALTH_CHECKER]

    def apply_config(self, config: Config) -> None:
        """A reloaded config's proxy settings apply from the next request on."""
        self.forwarder.apply_config(config)

    def wake_checks(self) -> None:
        """Check every backend now (membership or [health] changed) instead of after the interval."""
        self.health_checker.wake()

    async def forget_upstream(self, url: str) -> None:
        """Close the connections to an address no backend uses any more."""
        await self.forwarder.upstream.discard(url)

    def retire_upstream(self, url: str) -> None:
        """A moved backend's old address: its connections close as soon as they are idle."""
        self.forwarder.upstream.retire(url)


def make_balancer_app(
    config: Config,
    *,
    pools: Pools,
    tracker: ErrorTracker,
    logger: logging.Logger,
    control: AdminControl | None = None,
    forwarded_api: dict[str, Any] | None = None,
    hosted_routes: RouteGroups | None = None,
) -> Balancer:
    """The balancer. Its cleanup context closes the upstream transport and owns the health checker:
    every backend has had one check before the app is ready to accept a request. With a
    `control` (the system's membership) it also serves the admin API. `forwarded_api` (the
    hosted backends' OpenAPI document) joins the balancer's own in /openapi.json while any backend
    is hosted. `hosted_routes` (the hosted backends' routes) groups the balancer's own errors on
    their paths as theirs are grouped. With `[control] port` the own endpoints go to a second
    app (`Balancer.control_app`), served on that port."""

    def group_own(path: str) -> str | None:
        if hosted_routes is None or not any(b.hosted for b in pools.backends):
            return None
        return hosted_routes(path)

    problems = ProblemMiddleware(server=BALANCER, tracker=tracker, logger=logger, name_answers=True, group_own=group_own)
    observers = pools.observers
    # One transport to the backends: proxied requests on its pools, checks on its dedicated connections.
    upstream = Transport.from_config(config.proxy)
    forwarder = Forwarder(pools, upstream, config, logger=logger, problems=problems, observers=observers)

    def forwarded(request: web.Request) -> bool:
        return request.match_info.route is catch_all

    own_endpoint = make_own_endpoint_middleware(lambda: forwarder.config, observers, forwarded=forwarded)
    app = web.Application(
        middlewares=[problems, own_endpoint],
        client_max_size=config.proxy.max_body_bytes or 2**63,
        handler_args={"max_field_size": config.proxy.max_header_bytes, "max_line_size": config.proxy.max_header_bytes},
    )
    # The app with the balancer's own endpoints: a second one, for the control listener, or the same.
    own = app if config.control.port is None else web.Application(middlewares=[problems, own_endpoint])
    app[FORWARDER] = forwarder

    def record_refusal(refusal: Refusal) -> None:
        # Refused before routing: no middleware saw it, so it is recorded here, once.
        tracker.record(
            status=refusal.status, method="-", path="-", server=BALANCER, detail=refusal.detail, request_id=refusal.request_id
        )
        forwarder.refused(refusal)

    stats = RequestStats(clock=pools.clock)
    observer = Metrics(pools, tracker)
    observers.add(stats)
    observers.add(observer)

    def config_error() -> str | None:
        return control.config_error if control is not None else None

    feed = LiveFeed(lambda: dashboard_snapshot(pools, stats, tracker, config_error), logger=logger)
    observers.add(feed)
    # What the own endpoints' handlers read.
    own[BACKEND_POOLS] = pools
    own[ERROR_TRACKER] = tracker
    own[REQUEST_STATS] = stats
    own[METRICS] = observer
    own[LIVE_FEED] = feed

    async def forward(request: web.Request) -> web.StreamResponse:
        return await forwarder(request)

    async def client_and_health(app: web.Application) -> AsyncIterator[None]:
        checker = HealthChecker(pools, transport_probe(upstream), observers=observers, logger=logger)
        app[HEALTH_CHECKER] = checker
        try:
            await checker.check_once()
            checker.start()
            yield
        finally:
            await checker.stop()
            await forwarder.close()

    async def end_streams(app: web.Application) -> None:
        # Open event streams would otherwise hold shutdown for its whole timeout.
        await feed.close()

    app.cleanup_ctx.append(client_and_health)
    own.on_shutdown.append(end_streams)
    own.router.add_get("/", make_page_handler())
    own.router.add_get("/events", events, allow_head=False)
    own.router.add_get("/metrics", metrics)
    own.router.add_get("/health", health)
    own.router.add_get("/status", status)
    own.router.add_get("/errors/stats", error_stats)
    # The task API is listed while a backend hosted here serves it (outside backends' APIs are their own).
    documents = {
        hosted: json.dumps(balancer_document(forwarded_api if hosted else None, admin=control is not None)).encode()
        for hosted in (False, True)
    }

    async def openapi(request: web.Request) -> web.Response:
        body = documents[any(backend.hosted for backend in pools.backends)]
        return web.Response(body=body, content_type="application/json")

    own.router.add_get("/openapi.json", openapi)
    if control is not None:
        own[ADMIN_CONTROL] = control
        own.router.add_delete("/errors/stats", guarded(reset_error_stats, logger))
    own.add_subapp("/admin", make_admin_app(control, logger))
    catch_all = app.router.add_route("*", "/" + CATCH_ALL_VARIABLE.replace("}", r":[\s\S]*}"), forward)
    # Read from the router, so a route added above is never forwarded by another spelling.
    own_paths = forwarder.own_paths = OwnPaths(app.router.resources(), skip=CATCH_ALL_VARIABLE)
    # The catch-all's match, made once: what the router would give a proxied request, less the
    # path variable, which nothing reads (the forwarder takes the raw target).
    proxied_match = web.UrlMappingMatchInfo({}, catch_all)
    proxied_match.add_app(app)
    proxied_match.freeze()

    def front(app_handler: AppHandler) -> AppHandler:
        def proxied_or_own(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            # A proxied request skips the router's walk and aiohttp's middleware chain (about 9 µs
            # a request, benchmarks/run.py): it gets the catch-all's match, as the router would give
            # it, and the problem middleware's steps in the forwarder's own frame. Anything else (own
            # paths, Expect) goes the usual way. Not a coroutine: it hands over the handler's awaitable.
            assert isinstance(request, web.Request)
            if own_paths.routed_elsewhere(request.rel_url.path_safe) or "Expect" in request.headers:
                return app_handler(request)
            set_match_info(request, proxied_match)
            return forwarder.serve(request)

        return proxied_or_own

    app[CLIENT_LIMITS] = ClientLimits(lambda: forwarder.config.proxy, record_refusal, front=front)
    if own is not app:
        own[CLIENT_LIMITS] = ClientLimits(lambda: forwarder.config.proxy, record_refusal)
    return Balancer(app, forwarder, feed, None if own is app else own, record_refusal)
