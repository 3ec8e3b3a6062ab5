"""The forwarding handler: moves a request to a backend chosen by the pool, and the answer back.

Policy (which backend, whether to retry, when a backend is sick) comes from the pool and the
retry policy; this module only moves bytes and reports what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from lb_system.balancing.events import BALANCER, Observer, Observers, ProxiedRequest, TryResult, render_tries
from lb_system.balancing.pool import Backend, BackendPool
from lb_system.balancing.pools import Pools
from lb_system.balancing.retry import FailureKind, RetryBudget, RetryPolicy
from lb_system.balancing.routes import UNROUTED
from lb_system.balancing.strategies import hash_key
from lb_system.config import Config
from lb_system.observability.access_log import AccessLog
from lb_system.observability.log import FIELDS
from lb_system.problems import (
    ANSWERED_BY_HEADER,
    ERROR_SERVER,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    RESPONSE_CUT,
    ROUTED,
    UPSTREAM_RECORDED,
    ProblemMiddleware,
    Routed,
    problem_response,
    request_id_from,
)
from lb_system.proxy.client_limits import Refusal
from lb_system.proxy.failures import Failure, classify
from lb_system.proxy.headers import HeaderPolicy, response_headers, strip_hop_by_hop
from lb_system.proxy.targets import OwnPaths, resolved_path, upstream_target
from lb_system.proxy.websocket import is_websocket_upgrade, tunnel_both_ways
from lb_system.upstream import Exchange, HeadFields, Transport, TunnelLimitReached, UpstreamError, split_url

# Bodies up to this size are read whole: one write each way and a retry can replay them.
BUFFER_LIMIT = 256 * 1024
STREAM_CHUNK = 64 * 1024
NO_BACKEND = "No healthy backend available"
NO_ROUTE = "No route for this request"
OVERLOADED = "Too many requests waiting for a backend connection"
TOO_MANY_TUNNELS = "Too many open WebSocket tunnels to the backend"
# The access line's word for a try whose answer started and was then cut (`tries=backend-1:cut`).
CUT = "cut"
INCOMPLETE = "response body incomplete"


BODY_INCOMPLETE = "Request body incomplete or malformed"
# The body bytes a streamed answer passed to the client (a small one's are len(data)).
_STREAMED_BYTES = web.ResponseKey("streamed_bytes", int)
_REASONS = {400: "bad_request", 405: "method_not_allowed", 408: "timeout", 413: "body_too_large"}


class _LimitedBody:
    """A request body streamed upstream; past `limit` bytes (when set) the upload is cut and
    the client gets a 413. Whatever goes wrong on the client's side (too large, too slow, cut,
    malformed) is kept in `client_error`: the client's failure, never the backend's."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content, self.limit = content, limit
        self.client_error: web.HTTPException | None = None
        self.seen = 0  # bytes read from the client so far

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.content.iter_chunked(STREAM_CHUNK):
                self.seen += len(chunk)
                if self.limit and self.seen > self.limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=self.limit, actual_size=self.seen)
                yield chunk
        except web.HTTPException as error:
            self.client_error = error
            raise
        except Exception:
            self.client_error = web.HTTPBadRequest(text=BODY_INCOMPLETE)
            raise


async def _small_body(upstream: Exchange, deadline: float | None = None) -> bytes | None:
    """An answer's body when it is small (read whole by `deadline`: b"" for none), None when it is to be streamed."""
    if not upstream.has_body:  # HEAD, 1xx, 204, 304, or a Content-Length of 0
        return b""
    if upstream.content_length is not None and upstream.content_length <= BUFFER_LIMIT:
        return await upstream.read(deadline)
    return None


def sticky_cookie(name: str, value: str, *, secure: bool) -> str:
    """A sticky-session Set-Cookie value: for the whole site, out of scripts' reach, not sent on
    cross-site subrequests; Secure when the client came over TLS."""
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")


def _unavailable(request: web.Request, request_id: str, detail: str = NO_BACKEND) -> web.Response:
    """The balancer's 503: no healthy backend, or too many requests waiting; try again in a second."""
    return problem_response(503, detail, instance=request.path, request_id=request_id, headers={"Retry-After": "1"})


class _Holding:
    """`with _Holding(pool, backend):` the backend counts one request more inside (least
    connections, drains, /status), and one less on the way out, whatever happens: the one release."""

    __slots__ = ("backend", "pool")

    def __init__(self, pool: BackendPool, backend: Backend) -> None:
        self.pool, self.backend = pool, backend

    def __enter__(self) -> None:
        self.pool.acquire(self.backend)

    def __exit__(self, *exc: object) -> None:
        self.pool.release(self.backend)


class _TryFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.kind, self.reason, self.refused_answer = failure.kind, failure.reason, failure.refused_answer


class Forwarder:
    """Forwards one request with retries on other backends; the balancer app's catch-all handler."""

    def __init__(
        self,
        pools: Pools,
        upstream: Transport,
        config: Config,
        *,
        logger: logging.Logger,
        problems: ProblemMiddleware,
        observers: Observer | None = None,
    ) -> None:
        self.pools = pools
        self.upstream = upstream
        # backend URL -> (its Endpoint's origin, the path put before every target)
        self._routes: dict[str, tuple[str, str]] = {}
        self.logger = logger
        self.access_log = AccessLog(logger)
        self.apply_config(config)
        # One retry budget per pool: a sick pool's retries never spend another pool's share.
        self.budgets: dict[str, RetryBudget] = {}
        self.in_flight = 0
        self.observers = observers if observers is not None else Observers(logger)
        # The balancer's own paths (set once its routes exist): never forwarded by another spelling.
        self.own_paths: OwnPaths | None = None
        # The balancer app's problem middleware, whose steps `serve` takes in its own frame.
        self.problems = problems

    def apply_config(self, config: Config) -> None:
        proxy = config.proxy
        self.config = config
        self.policy = RetryPolicy(retries=proxy.retries, retry_on_status=frozenset(proxy.retry_on_status))
        self.header_policy = HeaderPolicy(proxy.trusted_proxies)
        self.upstream.apply_config(proxy)

    async def close(self) -> None:
        """Close every upstream connection and tunnel (the app's cleanup)."""
        await self.upstream.close()

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """A proxied request from the balancer's front: the problem middleware's steps taken here,
        in this frame, instead of around it (one coroutine level less on every request)."""
        problems = self.problems
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        try:
            response = await self._handle(request, request_id)
        except web.HTTPException as error:
            response = problems.http_exception(request, request_id, error)
        except Exception as error:
            response = problems.unhandled(request, request_id, error)
        if response.status < 400 and not len(response):
            return response  # a backend's whole answer, named already (_answer_headers): nothing to record
        return problems.finish(request, request_id, response)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """A proxied request that came through the router and the problem middleware."""
        return await self._handle(request, request[REQUEST_ID])

    async def _handle(self, request: web.Request, request_id: str) -> web.StreamResponse:
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.config.proxy.request_timeout
        try:
            # Refused before anything is counted against a backend; the access line names why.
            target, host = upstream_target(request)
            if self.own_paths is not None:
                self.own_paths.refuse(request, target)
            pool, target = self._pool_for(request, target, host) if self.pools.routed else (self.pools.default, target)
            if pool is None:  # no route, and no default pool to fall back to: the balancer's own 404
                self._finish(request, 404, started, request_id, reason="no_route")
                return problem_response(404, NO_ROUTE, instance=request.path, request_id=request_id)
            if is_websocket_upgrade(request):  # a tunnel holds no pooled connection: it has its own cap, not the pool's
                return await self._websocket(request, pool, request_id, started, target, host)
            # Read before the request counts against any backend: an upload in progress holds no
            # backend connection, so stalled uploads cannot starve other clients.
            body, replayable = await self._request_body(request) if request.body_exists else (None, True)
            # Capacity is never below max_pending: the scan over backends only runs near overload.
            if self.in_flight >= self.config.proxy.max_pending and self.in_flight >= self._capacity():
                self._finish(request, 503, started, request_id, logged_tries="shed", pool=pool)
                return _unavailable(request, request_id, OVERLOADED)
            self.in_flight += 1
            try:
                return await self._forward(request, pool, request_id, started, (target, host), body, replayable, deadline)
            finally:
                self.in_flight -= 1
        except web.HTTPMethodNotAllowed:
            # A wrong method on one of the balancer's own endpoints: its own answer, counted as its own.
            self._notify(request.method, 405, BALANCER, time.perf_counter() - started, [])
            raise
        except web.HTTPException as error:
            # The client's fault found on the way (a body too large, too slow or cut): the balancer answers it.
            reason = getattr(error, "refusal_reason", None) or _REASONS.get(error.status, "refused")
            self._finish(request, error.status, started, request_id, reason=reason)
            raise

    def refused(self, refusal: Refusal) -> None:
        """A request refused before routing (see client_limits): its access line and its count."""
        self.access_log.write(
            method=None,
            path=None,
            status=refusal.status,
            backend=None,
            duration_ms=0.0,
            request_id=refusal.request_id,
            tries=None,
            client=refusal.client,
            reason=refusal.reason,
        )
        self._notify("-", refusal.status, BALANCER, 0.0, [])

    def _capacity(self) -> int:
        """Requests past every eligible backend's connection cap wait, up to `max_pending`; more are shed."""
        proxy = self.config.proxy
        eligible = sum(1 for b in self.pools.backends if b.eligible)
        return eligible * proxy.max_connections_per_backend + proxy.max_pending

    async def _request_body(self, request: web.Request) -> tuple[bytes | _LimitedBody | None, bool]:
        """The body to send upstream and whether a retry can replay it. Small bodies are read whole;
        larger or chunked ones stream through, counted against `max_body_bytes`."""
        if not request.body_exists:
            return None, True
        limit = self.config.proxy.max_body_bytes
        length = request.content_length
        if limit and length is not None and length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
        if length is not None and length <= BUFFER_LIMIT:
            try:
                return await request.read(), True
            except (ConnectionError, RequestPayloadError):
                raise web.HTTPBadRequest(text=BODY_INCOMPLETE) from None
        return _LimitedBody(request.content, limit), False

    def _pool_for(self, request: web.Request, target: str, host: str | None) -> tuple[BackendPool | None, str]:
        """The request's pool and the target its backends get (a route may strip its prefix).
        With routes or several pools, the request remembers them for its access line and error record."""
        pools = self.pools
        if not pools.routed:
            return pools.default, target
        resolved = resolved_path(target)
        # The Host header itself: aiohttp's request.host falls back to socket.getfqdn(), a lookup on the loop.
        pool, route = pools.route(host if host is not None else request.headers.get("Host"), resolved)
        request[ROUTED] = Routed(None if pool is None else pool.name, UNROUTED if route is None else route.name)
        if route is not None:
            target = route.upstream_target(target, resolved)
        return pool, target

    def _budget(self, pool: BackendPool) -> RetryBudget:
        budget = self.budgets.get(pool.name)
        if budget is None:
            budget = self.budgets[pool.name] = RetryBudget(self.config.proxy.retry_budget_percent)
        return budget

    async def _forward(
        self,
        request: web.Request,
        pool: BackendPool,
        request_id: str,
        started: float,
        target: tuple[str, str | None],
        body: bytes | _LimitedBody | None,
        replayable: bool,
        deadline: float,
    ) -> web.StreamResponse:
        budget = self.budgets.get(pool.name) or self._budget(pool)
        budget.on_request()
        path, host = target
        # The backend's header lines, built once for every try (an absolute-form target names the Host).
        fields = self.header_policy.upstream_head_fields(request, request_id, host)
        key = None if pool.hash_on is None else self._hash_key(request, pool)
        pinned = None if pool.sticky_cookie is None else self._pinned(request, pool)

        tried: list[Backend] = []
        tries: list[TryResult] = []
        last_failure: _TryFailed | None = None
        holding_budget = False
        unreached = 0  # tries that never reached their backend (refused, connect timeout)
        try:
            while (backend := pool.choose(key, exclude=tried, pinned=pinned)) is not None:
                tried.append(backend)
                try_started = time.perf_counter()
                pool.acquire(backend)  # the backend counts this request until the try ends (released below)
                try:
                    try:
                        upstream, data = await self._send(request, backend, path, fields, body, deadline)
                    except _TryFailed as failure:
                        last_failure = failure
                        tries.append(TryResult(backend.name, None, time.perf_counter() - try_started, failure.reason))
                        if failure.kind is FailureKind.CONNECT:
                            # Nothing reached that backend and nothing of the body was read: another try
                            # adds no load, so neither the budget nor `retries` holds it back (the
                            # budget's window is empty after an idle spell: a burst would get 502s).
                            unreached += 1
                            if pool.has_candidate(exclude=tried):
                                continue
                            break
                        if not self._may_try_again(
                            pool, budget, request.method, failure.kind, tried, unreached, replayable, holding_budget
                        ):
                            break
                        holding_budget = True
                        continue
                    if self.policy.retryable_status(upstream.status) and self._may_try_again(
                        pool, budget, request.method, FailureKind.STATUS, tried, unreached, replayable, holding_budget
                    ):
                        holding_budget = True
                        if data is None:  # a streamed answer's outcome is otherwise recorded when it ends
                            self._record_answer(backend, upstream.status)
                        upstream.release()
                        tries.append(TryResult(backend.name, upstream.status, time.perf_counter() - try_started))
                        continue
                    if data is None:
                        response = await self._relay(request, backend, upstream, request_id)
                    else:
                        response = self._answer(request, backend, upstream, data, request_id)
                    cut = None if data is not None else response.get(RESPONSE_CUT)  # only a streamed answer can be cut
                    duration = time.perf_counter() - try_started
                    if cut is None:
                        tries.append(TryResult(backend.name, upstream.status, duration))
                    else:
                        tries.append(TryResult(backend.name, None, duration, CUT))
                    sent = len(body) if isinstance(body, bytes) else (body.seen if body is not None else 0)
                    received = len(data) if data is not None else response.get(_STREAMED_BYTES, 0)
                    # A cut answer is the backend's 502 for the observers, whatever its status line said.
                    observed = response.status if cut is None else 502
                    self._finish(
                        request,
                        response.status,
                        started,
                        request_id,
                        tries,
                        backend.name,
                        observed,
                        pool=pool,
                        sizes=(sent, received),
                    )
                    return response
                finally:
                    pool.release(backend)
        finally:
            if holding_budget:  # one budget slot covers all the retries of one request
                budget.release()

        if last_failure is None:
            response = _unavailable(request, request_id)
        elif last_failure.kind is FailureKind.TIMEOUT:
            response = problem_response(504, "Backend did not answer in time", instance=request.path, request_id=request_id)
        else:
            reason = last_failure.reason
            detail = reason if last_failure.refused_answer else f"No backend answered: {reason}"
            response = problem_response(502, detail, instance=request.path, request_id=request_id)
        self._finish(request, response.status, started, request_id, tries, no_backend=last_failure is None, pool=pool)
        return response

    def _finish(
        self,
        request: web.Request,
        status: int,
        started: float,
        request_id: str,
        tries: list[TryResult] | None = None,
        answered_by: str = BALANCER,
        observed_status: int | None = None,
        *,
        logged_backend: str | None = None,
        logged_tries: str | None = None,
        reason: str | None = None,
        no_backend: bool = False,
        pool: BackendPool | None = None,
        sizes: tuple[int, int] = (0, 0),
    ) -> None:
        """The end of a request: its access line and what the observers hear, in one place.

        `tries` go to both (rendered for the access line's `tries=`); `answered_by` names the
        backend whose answer the client got (the balancer's own otherwise), the line's backend
        unless `logged_backend` says otherwise; `observed_status` is what the observers count
        when it is not the status sent (a cut answer is the backend's 502)."""
        if tries is None:
            tries = []
        elif logged_tries is None:
            logged_tries = render_tries(tries)
        if logged_backend is None and answered_by != BALANCER:
            logged_backend = answered_by
        # One clock read for both: the line's duration and the observers'.
        duration = time.perf_counter() - started
        self._access_log(request, status, logged_backend, duration, request_id, logged_tries, reason=reason)
        self._notify(
            request.method,
            status if observed_status is None else observed_status,
            answered_by,
            duration,
            tries,
            no_backend=no_backend,
            pool=pool,
            sizes=sizes,
        )

    def _notify(
        self,
        method: str,
        status: int,
        backend: str,
        duration: float,
        tries: list[TryResult],
        *,
        no_backend: bool = False,
        pool: BackendPool | None = None,
        sizes: tuple[int, int] = (0, 0),
    ) -> None:
        """What the observers hear of a request that took `duration` seconds."""
        self.observers.on_request(
            ProxiedRequest(
                method,
                status,
                backend,
                duration,
                tuple(tries),
                no_backend,
                None if pool is None else pool.name,
                *sizes,
            )
        )

    @staticmethod
    def _hash_key(request: web.Request, pool: BackendPool) -> str | None:
        if pool.hash_on is None:
            return None
        return hash_key(pool.hash_on, client_ip=request.remote or "", path=request.path, headers=request.headers)

    async def _websocket(
        self, request: web.Request, pool: BackendPool, request_id: str, started: float, path: str, host: str | None
    ) -> web.StreamResponse:
        """Tunnel a WebSocket to one backend, raw bytes after its 101, until either side closes."""
        backend = pool.choose(self._hash_key(request, pool), pinned=self._pinned(request, pool))
        if backend is None:
            self._notify(request.method, 503, BALANCER, time.perf_counter() - started, [], no_backend=True, pool=pool)
            return _unavailable(request, request_id)
        headers = self.header_policy.upstream_headers(request, request_id)
        if host is not None:
            headers["Host"] = host
        # The handshake goes through whole (Sec-WebSocket-*): the backend answers the client's key.
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = request.headers["Upgrade"]
        origin, prefix = self._route(backend)
        timeout = self.config.proxy.per_try_timeout
        upstream = None
        with _Holding(pool, backend):
            try:
                async with asyncio.timeout(timeout):
                    upstream = await self.upstream.endpoint(origin).open_tunnel(
                        request.method, prefix + path if prefix else path, headers.items(), timeout=timeout
                    )
                    data = None if upstream.status == 101 else await _small_body(upstream)
            except TunnelLimitReached:
                self._finish(request, 503, started, request_id, logged_backend=backend.name, reason="tunnels", pool=pool)
                return _unavailable(request, request_id, TOO_MANY_TUNNELS)
            except (UpstreamError, TimeoutError) as error:
                if upstream is not None:
                    upstream.release()
                reason = classify(error).reason
                self.pools.pool_of(backend).record_passive_failure(backend, reason)
                failed = TryResult(backend.name, None, time.perf_counter() - started, reason)
                self._finish(request, 502, started, request_id, [failed], logged_backend=backend.name, pool=pool)
                return problem_response(
                    502, f"WebSocket handshake with the backend failed: {reason}", instance=request.path, request_id=request_id
                )
            if upstream.status != 101:  # the backend declined the upgrade: its answer goes to the client
                if data is not None:  # a streamed answer's outcome is recorded when it ends
                    self._record_answer(backend, upstream.status)
                if data is None:
                    response = await self._relay(request, backend, upstream, request_id)
                else:
                    response = self._answer(request, backend, upstream, data, request_id)
                refused = TryResult(backend.name, upstream.status, time.perf_counter() - started)
                self._finish(request, response.status, started, request_id, [refused], backend.name, pool=pool)
                return response
            answer = response_headers(upstream.headers)
            answer["Connection"] = "Upgrade"
            answer["Upgrade"] = upstream.header("Upgrade") or "websocket"
            answer[ANSWERED_BY_HEADER] = backend.name
            self._pin(request, backend, answer)
            answer[REQUEST_ID_HEADER] = request_id
            tunnel = upstream.detach()
            # Counted at the handshake: the session that follows may last for hours.
            opened = TryResult(backend.name, 101, time.perf_counter() - started)
            self._notify(request.method, 101, backend.name, opened.duration_s, [opened], pool=pool)
            client = await tunnel_both_ways(request, upstream.status, upstream.reason, answer, tunnel)
            self._access_log(request, 101, backend.name, time.perf_counter() - started, request_id, render_tries([opened]))
            return client

    @staticmethod
    def _pinned(request: web.Request, pool: BackendPool) -> str | None:
        """The sticky cookie's value, when the pool pins clients and the request carries one."""
        name = pool.sticky_cookie
        return None if name is None else request.cookies.get(name)

    def _pin(self, request: web.Request, backend: Backend, headers: CIMultiDict[str]) -> None:
        """Set the sticky cookie on an answer unless the request already names this backend (a first
        answer, or one re-routed from a backend that went down, drained or was ejected)."""
        name = self.pools.pool_of(backend).sticky_cookie
        if name is not None and request.cookies.get(name) != backend.sticky_id:
            headers.add("Set-Cookie", sticky_cookie(name, backend.sticky_id, secure=request.secure))

    def _route(self, backend: Backend) -> tuple[str, str]:
        """The backend's Endpoint origin and the path put before every target."""
        route = self._routes.get(backend.url)
        if route is None:
            route = self._routes[backend.url] = split_url(backend.url)
        return route

    def _may_try_again(
        self,
        pool: BackendPool,
        budget: RetryBudget,
        method: str,
        kind: FailureKind,
        tried: list[Backend],
        unreached: int,
        replayable: bool,
        holding_budget: bool,
    ) -> bool:
        """The one retry question, after a try that reached its backend (failed, or a retryable
        status): the policy allows it (tries that never reached a backend are not counted), a
        backend not yet tried is left, and the retry budget has room (one slot covers all of one
        request's retries, so a request already holding one needs no other)."""
        attempt = len(tried) - unreached
        return (
            self.policy.should_retry(method=method, failure=kind, attempt=attempt, body_replayable=replayable)
            and pool.has_candidate(exclude=tried)
            and (holding_budget or budget.try_acquire())
        )

    async def _send(
        self,
        request: web.Request,
        backend: Backend,
        path: str,
        fields: HeadFields,
        body: bytes | _LimitedBody | None,
        deadline: float,
    ) -> tuple[Exchange, bytes | None]:
        """One try. A small answer is read whole here, so a failure while reading it is still a
        failed try (nothing reached the client); a large one comes back unread (None) to stream.
        The caller holds the backend (its active count) for the whole try."""
        loop = asyncio.get_running_loop()
        proxy = self.config.proxy
        timeout = min(proxy.per_try_timeout, deadline - loop.time())
        origin, prefix = self._route(backend)
        endpoint = self.upstream.endpoint(origin)
        upstream = None
        try:
            if timeout <= 0:
                raise TimeoutError
            # The transport bounds each wait of the try by its deadline: a timer per wait, no timeout scope.
            try_deadline = loop.time() + timeout
            upstream = await endpoint.request(
                request.method,
                prefix + path if prefix else path,
                fields,
                body,
                body_length=request.content_length if isinstance(body, _LimitedBody) else None,
                read_timeout=proxy.per_try_timeout,  # each wait for the next piece of a streamed body
                deadline=try_deadline,
            )
            if not upstream.has_body:  # HEAD, 1xx, 204, 304, or a Content-Length of 0
                data: bytes | None = b""
            elif upstream.content_length is not None and upstream.content_length <= BUFFER_LIMIT:
                # Usually the body came with the head: taken as it is, without read()'s coroutines.
                data = upstream.body_arrived()
                if data is None:
                    data = await upstream.read(try_deadline)
            else:
                data = None  # streamed by the caller
        except BaseException as error:
            if upstream is not None:
                upstream.release()
            if not isinstance(error, Exception):  # cancelled: the client left or the server stops
                raise
            if isinstance(body, _LimitedBody) and body.client_error is not None:
                raise body.client_error from None
            failure = classify(error)
            if failure.blames_backend:
                self.pools.pool_of(backend).record_passive_failure(backend, failure.reason)
            raise _TryFailed(failure) from None
        if data is not None:
            self._record_answer(backend, upstream.status)
        return upstream, data

    def _record_answer(self, backend: Backend, status: int) -> None:
        """A whole answer: a proxied success for the pool, unless it is a 5xx and `passive_5xx` counts those."""
        pool = self.pools.pool_of(backend)
        if status >= 500 and pool.health.passive_5xx:
            pool.record_passive_failure(backend, f"status {status}")
        else:
            pool.record_passive_success(backend)

    def _answer(
        self, request: web.Request, backend: Backend, upstream: Exchange, data: bytes, request_id: str
    ) -> web.StreamResponse:
        """A small answer, read whole: the client's response, and the connection released."""
        try:
            status = upstream.status
            response = web.Response(status=status, reason=upstream.reason, headers=upstream.headers, body=data or None)
            headers = self._answer_headers(request, backend, upstream, response, request_id)
            if data:  # aiohttp sets the length of the body it sends; a HEAD keeps the backend's
                headers.pop("Content-Length", None)
        finally:
            upstream.release()
        if status >= 400:
            response[ERROR_SERVER] = backend.name
            response[UPSTREAM_RECORDED] = backend.hosted
        return response

    async def _relay(self, request: web.Request, backend: Backend, upstream: Exchange, request_id: str) -> web.StreamResponse:
        """A large or chunked answer, streamed to the client; the connection released after."""
        try:
            response = await self._stream(request, backend, upstream, request_id)
        finally:
            upstream.release()
        if upstream.status >= 400:
            response[ERROR_SERVER] = backend.name
            response[UPSTREAM_RECORDED] = backend.hosted
        return response

    def _answer_headers(
        self, request: web.Request, backend: Backend, upstream: Exchange, response: web.StreamResponse, request_id: str
    ) -> CIMultiDict[str]:
        """The response's copy of the backend's headers, edited in place (aiohttp's own copy is
        the only one made): hop-by-hop gone, the backend named, the sticky cookie, the request id."""
        headers = response.headers
        if upstream.hop_by_hop:  # noted while parsing: most answers have none to strip
            strip_hop_by_hop(headers)
        headers[ANSWERED_BY_HEADER] = backend.name
        self._pin(request, backend, headers)
        headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def _stream(self, request: web.Request, backend: Backend, upstream: Exchange, request_id: str) -> web.StreamResponse:
        """Relay a large or chunked answer. One the backend cuts (closed early, short, stalled past
        `per_try_timeout`) is that backend's failure: counted towards ejection and marked on the
        response (RESPONSE_CUT) so it is recorded as its 502."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=upstream.headers)
        self._answer_headers(request, backend, upstream, response, request_id).pop("Content-Length", None)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        relayed = 0
        try:
            # Each read waits at most `per_try_timeout` (the response's read_timeout) for a backend that
            # stops sending mid-body; the transport stops reading from the backend while the client is
            # slow to take what was read (flow control both ways), so memory stays bounded.
            while chunk := await upstream.read_chunk():
                try:
                    await response.write(chunk)
                except ConnectionResetError:
                    return response  # the client left: nothing to tell anyone
                relayed += len(chunk)
                response[_STREAMED_BYTES] = relayed
        except UpstreamError as error:
            reason = classify(error).reason
            self.logger.warning(
                "upstream body failed",
                extra={
                    FIELDS: {
                        "backend": backend.name,
                        "method": request.method,
                        "path": request.path,
                        "reason": reason,
                        "request_id": request[REQUEST_ID],
                    }
                },
            )
            self.pools.pool_of(backend).record_passive_failure(backend, reason)
            response[RESPONSE_CUT] = INCOMPLETE if reason == INCOMPLETE else f"{INCOMPLETE}: {reason}"
            response[ERROR_SERVER] = backend.name
            # The status line is gone already: the only honest signal left to the client is a cut connection.
            if request.transport is not None:
                request.transport.abort()
            return response
        self._record_answer(backend, upstream.status)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    def _access_log(
        self,
        request: web.Request,
        status: int,
        backend: str | None,
        duration: float,
        request_id: str,
        tries: str | None,
        *,
        reason: str | None = None,
    ) -> None:
        """The access line of a request that took `duration` seconds."""
        routed = request.get(ROUTED) if self.pools.routed else None
        self.access_log.write(
            method=request.method,
            path=request.path,
            status=status,
            backend=backend,
            duration_ms=duration * 1000,
            request_id=request_id,
            tries=tries,
            client=(request.remote or "-") if reason else None,
            reason=reason,
            pool=None if routed is None else routed.pool or UNROUTED,
            route=None if routed is None else routed.route,
        )
