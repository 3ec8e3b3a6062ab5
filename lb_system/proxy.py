"""The forwarding handler: moves a request to a backend chosen by the pool, and the answer back.

Policy (which backend, whether to retry, when a backend is sick) comes from the pool and the
retry policy; this module only moves bytes and reports what happened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .backend_pool import Backend, BackendPool
from .config import Config
from .keys import ERROR_SERVER, REQUEST_ID, UPSTREAM_RECORDED
from .problems import REQUEST_ID_HEADER, problem_response
from .retry import FailureKind, RetryBudget, RetryPolicy
from .strategies import hash_key
from .transport import describe_failure, is_connect_failure

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Dropped towards the backend besides hop-by-hop: aiohttp's server already answered "Expect".
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}
# Bodies up to this size are read whole: one write each way and a retry can replay them.
BUFFER_LIMIT = 256 * 1024
STREAM_CHUNK = 64 * 1024
NO_BACKEND = "No healthy backend available"


def _without_hop_by_hop(headers, also_drop: frozenset[str]) -> CIMultiDict[str]:
    connection_tokens = {
        token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",") if token.strip()
    }
    drop = also_drop | connection_tokens if connection_tokens else also_drop
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class _TryFailed(Exception):
    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Forwarder:
    """Forwards one request with retries on other backends; the balancer app's catch-all handler."""

    def __init__(
        self,
        pool: BackendPool,
        session_getter: Callable[[], aiohttp.ClientSession],
        config: Config,
        *,
        logger: logging.Logger,
        budget: RetryBudget | None = None,
    ) -> None:
        self.pool = pool
        self._session = session_getter
        self.logger = logger
        self.apply_config(config)
        self.budget = budget or RetryBudget(config.proxy.retry_budget_percent)

    def apply_config(self, config: Config) -> None:
        proxy = config.proxy
        self.config = config
        self.policy = RetryPolicy(retries=proxy.retries, retry_on_status=frozenset(proxy.retry_on_status))
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in proxy.trusted_proxies]
        self.hash_on = config.balancer.hash_on if config.balancer.strategy == "consistent_hash" else None

    def _trusted(self, remote: str | None) -> bool:
        if not self.trusted or not remote:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def upstream_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        headers = _without_hop_by_hop(request.headers, _NOT_FORWARDED)
        remote = request.remote or ""
        if self._trusted(remote):
            prior = ", ".join(headers.getall("X-Forwarded-For", ()))
            headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
            headers.setdefault("X-Forwarded-Proto", request.scheme)
            headers.setdefault("X-Forwarded-Host", request.host)
        else:
            headers["X-Forwarded-For"] = remote
            headers["X-Forwarded-Proto"] = request.scheme
            headers["X-Forwarded-Host"] = request.host
        via = headers.get("Via")
        headers["Via"] = f"{via}, 1.1 lb_system" if via else "1.1 lb_system"
        headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request[REQUEST_ID]
        self.budget.on_request()
        proxy = self.config.proxy
        loop = asyncio.get_running_loop()
        deadline = loop.time() + proxy.request_timeout

        body: bytes | aiohttp.StreamReader | None = None
        replayable = True
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= BUFFER_LIMIT:
                body = await request.read()
            else:
                body, replayable = request.content, False
        headers = self.upstream_headers(request, request_id)
        key = None
        if self.hash_on is not None:
            key = hash_key(self.hash_on, client_ip=request.remote or "", path=request.path, headers=request.headers)

        tried: list[Backend] = []
        tries_log: list[str] = []
        last_failure: _TryFailed | None = None
        retrying = False
        try:
            while True:
                backend = self.pool.choose(key, exclude=tried)
                if backend is None:
                    break
                tried.append(backend)
                try:
                    upstream = await self._send(request, backend, headers, body, deadline)
                except _TryFailed as failure:
                    last_failure = failure
                    tries_log.append(f"{backend.name}:{failure.reason}")
                    if not self._may_retry(request.method, failure.kind, len(tried), replayable):
                        break
                    retrying = self._acquire_retry(retrying)
                    if not retrying:
                        break
                    continue
                if self.policy.retryable_status(upstream.status) and self._may_retry(
                    request.method, FailureKind.STATUS, len(tried), replayable
                ):
                    if self.pool.choose(key, exclude=tried) is not None:
                        next_retrying = self._acquire_retry(retrying)
                        if next_retrying:
                            retrying = True
                            tries_log.append(f"{backend.name}:{upstream.status}")
                            upstream.release()
                            backend.active_requests -= 1
                            continue
                tries_log.append(f"{backend.name}:{upstream.status}")
                return await self._respond(request, backend, upstream, request_id, started, tries_log)
        finally:
            if retrying:
                self.budget.release()

        if last_failure is None:
            response = problem_response(
                503, NO_BACKEND, instance=request.path, request_id=request_id, headers={"Retry-After": "1"}
            )
        elif last_failure.kind is FailureKind.TIMEOUT:
            response = problem_response(504, "Backend did not answer in time", instance=request.path, request_id=request_id)
        else:
            response = problem_response(
                502, f"No backend answered: {last_failure.reason}", instance=request.path, request_id=request_id
            )
        self._access_log(request, response.status, "-", started, request_id, tries_log)
        return response

    def _may_retry(self, method: str, kind: FailureKind, attempts: int, replayable: bool) -> bool:
        return self.policy.should_retry(method=method, failure=kind, attempt=attempts, body_replayable=replayable)

    def _acquire_retry(self, already_holding: bool) -> bool:
        """One budget slot covers all the retries of one request."""
        return already_holding or self.budget.try_acquire()

    async def _send(
        self,
        request: web.Request,
        backend: Backend,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        deadline: float,
    ) -> aiohttp.ClientResponse:
        """One try, up to the response headers. On success the backend's active count stays raised
        until the response is finished."""
        proxy = self.config.proxy
        loop = asyncio.get_running_loop()
        timeout = min(proxy.per_try_timeout, deadline - loop.time())
        backend.requests += 1
        backend.active_requests += 1
        try:
            if timeout <= 0:
                raise asyncio.TimeoutError
            async with asyncio.timeout(timeout):
                upstream = await self._session().request(
                    request.method,
                    backend.url + request.raw_path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, connect=proxy.connect_timeout, sock_read=proxy.per_try_timeout),
                )
        except asyncio.CancelledError:
            backend.active_requests -= 1
            raise
        except Exception as error:
            backend.active_requests -= 1
            reason = describe_failure(error)
            if is_connect_failure(error):
                kind = FailureKind.CONNECT
            elif isinstance(error, asyncio.TimeoutError):
                kind = FailureKind.TIMEOUT
            else:
                kind = FailureKind.RESET
            self.pool.record_passive_failure(backend, reason)
            raise _TryFailed(kind, reason) from None
        if upstream.status >= 500 and self.pool.health.passive_5xx:
            self.pool.record_passive_failure(backend, f"status {upstream.status}", unreachable=False)
        else:
            self.pool.record_passive_success(backend)
        return upstream

    async def _respond(
        self,
        request: web.Request,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        started: float,
        tries_log: list[str],
    ) -> web.StreamResponse:
        try:
            headers = _without_hop_by_hop(upstream.headers, HOP_BY_HOP)
            headers["X-Backend"] = backend.name
            headers[REQUEST_ID_HEADER] = request_id
            no_body = request.method == "HEAD" or upstream.status in (204, 304) or 100 <= upstream.status < 200
            length = upstream.content_length
            if no_body or (length is not None and length <= BUFFER_LIMIT):
                data = b"" if no_body else await upstream.read()
                if not no_body:
                    headers.pop("Content-Length", None)
                response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=data or None)
            else:
                response = await self._stream(request, upstream, headers)
        finally:
            upstream.release()
            backend.active_requests -= 1
        if upstream.status >= 400:
            response[ERROR_SERVER] = backend.name
            response[UPSTREAM_RECORDED] = backend.hosted
        self._access_log(request, upstream.status, backend.name, started, request_id, tries_log)
        return response

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        headers.pop("Content-Length", None)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            # The status line is gone already: the only honest signal left is a cut connection.
            self.logger.warning(
                "upstream body failed method=%s path=%s reason=%r request_id=%s",
                request.method,
                request.path,
                describe_failure(error),
                request[REQUEST_ID],
            )
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    def _access_log(
        self, request: web.Request, status: int, backend: str, started: float, request_id: str, tries: list[str]
    ) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(
                "access method=%s path=%s status=%d backend=%s duration_ms=%.2f request_id=%s tries=%s",
                request.method,
                request.path,
                status,
                backend,
                (time.perf_counter() - started) * 1000,
                request_id,
                ",".join(tries) or "-",
            )
