"""RFC 9457 problem details, request ids, and the middleware that turns every failure into both."""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple

from aiohttp import web

from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.log import FIELDS

PROBLEM_CONTENT_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
ANSWERED_BY_HEADER = "X-Backend"
CATCH_ALL_VARIABLE = "{proxied_path}"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

REQUEST_ID = web.RequestKey("request_id", str)
# The problem detail rides on the response so the middleware records it without re-parsing JSON.
PROBLEM_DETAIL = web.ResponseKey("problem_detail", str)
# Set by the proxy on a backend's error answer: whose error it is, and whether a hosted
# backend (sharing our tracker) already recorded it, so each failure is counted once.
ERROR_SERVER = web.ResponseKey("error_server", str)
UPSTREAM_RECORDED = web.ResponseKey("upstream_recorded", bool)
# Set on an answer whose error status is its message, not an error (the balancer's /health while
# unavailable: a probe polling it must not fill the recent errors).
NOT_AN_ERROR = web.ResponseKey("not_an_error", bool)
# Set by the proxy when a backend cut an answer already under way: recorded as that backend's 502 with this detail.
RESPONSE_CUT = web.ResponseKey("response_cut", str)


class Routed(NamedTuple):
    """The pool (None: no route and no default pool) and the route (`-`: none matched) of a request."""

    pool: str | None
    route: str


# Set by the forwarder when requests are sorted into pools: the access line and the error record name both.
ROUTED = web.RequestKey("routed", Routed)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    # A correlation id, not a secret: the PRNG is unique enough and spares a getrandom() call per request.
    return f"{random.getrandbits(64):016x}"


def request_id_from(header_value: str | None) -> str:
    """Keep a client's id when it is safe to log and echo, otherwise make one."""
    if header_value and _VALID_REQUEST_ID.fullmatch(header_value):
        return header_value
    return new_request_id()


def status_title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (aiohttp's json_response, without its per-call keyword plumbing)."""
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json", headers=headers)


def problem_body(status: int, detail: str, *, instance: str | None, request_id: str, **extra: object) -> bytes:
    """The JSON of a problem; `instance` None (a request refused before its path was known) leaves it out."""
    body: dict[str, object] = {"type": "about:blank", "title": status_title(status), "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body["request_id"] = request_id
    body.update(extra)
    return json.dumps(body).encode()


def problem_response(
    status: int,
    detail: str,
    *,
    instance: str | None,
    request_id: str,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """A problem+json response; `detail` must be safe to show a client (never exception text)."""
    response = web.Response(
        status=status,
        body=problem_body(status, detail, instance=instance, request_id=request_id, **extra),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
    response[PROBLEM_DETAIL] = detail
    return response


def _detail_for_http_exception(error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return "Request body too large"
    text = error.text or ""
    # aiohttp's own exceptions carry "404: Not Found"-style text; show the plain phrase instead.
    if not text or text.startswith(f"{error.status}:"):
        return status_title(error.status)
    return text


class RouteGroups:
    """The dynamic route patterns of an app ("/tasks/{id}"), to group raw paths another app
    saw under them. Read once from the app's router: no route is listed twice by hand."""

    def __init__(self, app: web.Application) -> None:
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for resource in app.router.resources():
            pattern = resource.get_info().get("pattern")
            if isinstance(pattern, re.Pattern):
                self._patterns.append((pattern, resource.canonical))

    def __call__(self, path: str) -> str | None:
        """The pattern `path` matches, or None (plain routes need no grouping)."""
        return next((canonical for pattern, canonical in self._patterns if pattern.fullmatch(path)), None)


class ProblemMiddleware:
    """Wraps everything: assigns the request id, renders every failure as problem details,
    and records each response with status >= 400 once, under `server`.

    A backend's error answer passed on by the proxy is recorded under that backend's name,
    and not at all when a hosted backend already recorded it. A response that has already
    started streaming is never replaced by an error page. With `name_answers`, answers that
    name no backend get `X-Backend: <server>` (a handler that streams sets it before preparing).
    `group_own` gives the route pattern of a path on which `server` answered an error itself
    from a route that says nothing (the balancer's 502/503/504 on a backend's path).

    An aiohttp middleware (`__call__`); its steps are also methods, so a handler that runs
    outside the middleware chain (the balancer's proxied requests) does the same in its own frame.
    """

    __slots__ = ("server", "tracker", "logger", "name_answers", "group_own")
    __middleware_version__ = 1  # what @web.middleware marks: a new-style middleware

    def __init__(
        self,
        *,
        server: str,
        tracker: ErrorTracker,
        logger: logging.Logger,
        name_answers: bool = False,
        group_own: Callable[[str], str | None] | None = None,
    ) -> None:
        self.server, self.tracker, self.logger = server, tracker, logger
        self.name_answers, self.group_own = name_answers, group_own

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except web.HTTPException as error:
            response = self.http_exception(request, request_id, error)
        except Exception as error:
            response = self.unhandled(request, request_id, error)
        return self.finish(request, request_id, response)

    def http_exception(self, request: web.Request, request_id: str, error: web.HTTPException) -> web.StreamResponse:
        """The problem+json answer to an HTTP exception a handler raised (re-raised below 400, or
        once bytes went out)."""
        if error.status < 400 or request.writer.output_size > 0:
            raise error
        headers = {k: v for k, v in error.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return problem_response(
            error.status, _detail_for_http_exception(error), instance=request.path, request_id=request_id, headers=headers
        )

    def unhandled(self, request: web.Request, request_id: str, error: Exception) -> web.StreamResponse:
        """The 500 for a handler's bug, logged with its traceback (re-raised once bytes went out:
        aiohttp cuts the connection, the only honest signal left)."""
        self.logger.error(
            "unhandled error",
            exc_info=error,
            extra={FIELDS: {"server": self.server, "method": request.method, "path": request.path, "request_id": request_id}},
        )
        if request.writer.output_size > 0:
            raise error
        return problem_response(500, "Internal server error", instance=request.path, request_id=request_id)

    def finish(self, request: web.Request, request_id: str, response: web.StreamResponse) -> web.StreamResponse:
        """Record an error answer once, and name the answer (request id, who answered) unless it streams already."""
        # A cut answer is recorded as the backend's 502. Most responses carry no mark at all: asking
        # only then spares the KeyError that Mapping.get raises and catches for a missing one.
        cut = response.get(RESPONSE_CUT) if len(response) else None
        status = response.status if cut is None else 502
        if (
            status >= 400
            and (cut is not None or not response.get(UPSTREAM_RECORDED, False))
            and not response.get(NOT_AN_ERROR, False)
        ):
            answered_by = response.get(ERROR_SERVER)
            route = _route_pattern(request)
            if route is None and answered_by is None and self.group_own is not None:
                route = self.group_own(request.path)
            routed = request.get(ROUTED)
            self.tracker.record(
                status=status,
                method=request.method,
                path=request.path,
                server=answered_by or self.server,
                detail=cut or response.get(PROBLEM_DETAIL) or status_title(status),
                request_id=request_id,
                route=route,
                routed=None if routed is None else (routed.pool, routed.route),
            )
        if not response.prepared:
            response.headers.setdefault(REQUEST_ID_HEADER, request_id)
            if self.name_answers:  # a forwarded answer names its backend already
                response.headers.setdefault(ANSWERED_BY_HEADER, self.server)
        return response


def _route_pattern(request: web.Request) -> str | None:
    """The matched route ("/tasks/{id}"), so error stats group ids together; None when unrouted."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    canonical = resource.canonical
    # The balancer's catch-all says nothing about the path: keep the raw one.
    return None if CATCH_ALL_VARIABLE in canonical else canonical


# The problem+json body as JSON Schema, for the OpenAPI documents of every app.
PROBLEM_SCHEMA: dict[str, object] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail", "instance", "request_id"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
    },
}


REQUEST_ID_HEADER_SPEC: dict[str, object] = {
    "description": "The client's valid X-Request-ID, or one made for this request",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{_VALID_REQUEST_ID.pattern}$"},
}


def add_response_headers(paths: dict[str, Any], headers: dict[str, Any]) -> None:
    """Declare `headers` on every response of every operation in an OpenAPI `paths` object."""
    for item in paths.values():
        for method, operation in item.items():
            if method != "parameters":
                for response in operation["responses"].values():
                    response["headers"] = {**response.get("headers", {}), **headers}


def problem_spec(description: str) -> dict[str, object]:
    """An OpenAPI response whose body is problem details (refers to components' `Problem`)."""
    return {
        "description": description,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
