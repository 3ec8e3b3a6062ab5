"""The admin API under /admin/ on the balancer: bearer-token authorisation, backend actions,
reload, and resetting the error counters. Every admin request is logged, never its token."""

from __future__ import annotations

import hmac
import logging
import os
import re
from typing import Protocol

from aiohttp import web

from lb_system.balancing.pool import DISABLED, DRAINING, ENABLED, Backend
from lb_system.balancing.pools import Pools
from lb_system.config import DEFAULT_TOKEN_ENV, Config, ConfigError
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.log import FIELDS
from lb_system.problems import Handler, json_response

ACTIONS = ("disable", "enable", "drain", "stop", "start")
_STATE_FOR = {"disable": DISABLED, "enable": ENABLED, "drain": DRAINING}
_BACKEND_ACTION = re.compile(r"^/admin/backends/([^/]+)/([^/]+)$")


class ActionRefused(Exception):
    """An admin action that cannot be done now (a port taken meanwhile); answered with 409."""


class ReloadOutcome(Protocol):
    """What a reload tells the admin API (the operations layer's ReloadPlan is one)."""

    def summary(self) -> dict[str, object]: ...


class AdminControl(Protocol):
    """What the admin API drives; the System implements it."""

    config: Config
    pool: Pools | None
    tracker: ErrorTracker
    config_error: str | None

    async def reload(self, origin: str = ...) -> ReloadOutcome: ...

    def set_admin_state(self, backend: Backend, state: str) -> bool: ...

    async def stop_backend(self, name: str) -> bool: ...

    async def start_backend(self, name: str) -> bool: ...


ADMIN_CONTROL = web.AppKey("admin_control", AdminControl)


def _describe(request: web.Request) -> tuple[str, str]:
    """(action, target) for the admin log line; the log quotes what the client wrote."""
    match = _BACKEND_ACTION.match(request.path)
    if match:
        return match.group(2), match.group(1)
    if request.path == "/admin/reload":
        return "reload", "config"
    if request.path == "/errors/stats":
        return "reset_errors", "/errors/stats"
    return "unknown", request.path


def admin_api_on(config: Config) -> bool:
    """Whether the admin API answers: its token variable is set (and never shown)."""
    return bool(os.environ.get(config.admin.token_env, ""))


def _authorize(request: web.Request, token_env: str) -> None:
    token = os.environ.get(token_env, "")
    if not token:
        named = token_env if token_env == DEFAULT_TOKEN_ENV else f"{token_env} (named by [admin] token_env)"
        raise web.HTTPForbidden(
            text=(
                f"The admin API is off: no token is set. Set the environment variable {named} to a secret "
                f"before starting lb_system (for example `export {token_env}=$(openssl rand -hex 16)`, "
                f"or `set {token_env}=<secret>` on Windows), then send `Authorization: Bearer <secret>`"
            )
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time: the comparison must not tell an attacker how much of the token was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        challenge = 'Bearer realm="lb_system"'
        if scheme:
            challenge += ', error="invalid_token"'
        raise web.HTTPUnauthorized(
            text="Missing or invalid admin token: send `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": challenge},
        )


async def _authorized_and_logged(request: web.Request, handler: Handler, logger: logging.Logger) -> web.StreamResponse:
    """Authorise before anything else (even a 404 or 405 tells nothing without the token), then
    handle; log action, target, client and result, never the token."""
    action, target = _describe(request)
    status = 500
    try:
        control = request.app.get(ADMIN_CONTROL)
        if control is None:
            raise web.HTTPNotFound(text="No admin API is served here")
        _authorize(request, control.config.admin.token_env)
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        level = logging.INFO if status < 400 else logging.WARNING
        fields = {"action": action, "target": target, "client": request.remote, "result": status}
        logger.log(level, "admin", extra={FIELDS: fields})


def guarded(handler: Handler, logger: logging.Logger) -> Handler:
    """One handler of the balancer app behind the admin token (DELETE /errors/stats)."""

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        return await _authorized_and_logged(request, handler, logger)

    return guarded_handler


async def backend_action(request: web.Request) -> web.Response:
    control = request.app[ADMIN_CONTROL]
    name, action = request.match_info["name"], request.match_info["action"]
    assert control.pool is not None
    backend = control.pool.get(name)
    if backend is None:
        raise web.HTTPNotFound(text=f"Backend '{name}' not found")
    if action in _STATE_FOR:
        changed = control.set_admin_state(backend, _STATE_FOR[action])
    else:
        if not backend.hosted:
            raise web.HTTPConflict(
                text=f"Backend '{name}' is an outside server ({backend.url}): only backends hosted here can {action}"
            )
        try:
            changed = await (control.stop_backend(name) if action == "stop" else control.start_backend(name))
        except ActionRefused as error:
            raise web.HTTPConflict(text=f"Backend '{name}' cannot {action}: {error}") from None
    return json_response({"action": action, "backend": name, "changed": changed, "status": backend.status_dict()})


async def reload_config(request: web.Request) -> web.Response:
    control = request.app[ADMIN_CONTROL]
    try:
        plan = await control.reload(f"admin({request.remote or '-'})")
    except ConfigError as error:
        raise web.HTTPBadRequest(text=str(error)) from None
    return json_response({"reloaded": True, **plan.summary()})


async def reset_error_stats(request: web.Request) -> web.Response:
    tracker = request.app[ADMIN_CONTROL].tracker
    cleared = tracker.total
    tracker.reset()
    return json_response({"reset": True, "cleared_errors": cleared})


def make_admin_app(control: AdminControl | None, logger: logging.Logger) -> web.Application:
    """The admin API, a sub-application for /admin. Its middleware authorises and logs every
    request that falls under /admin, before the sub-app's own 404 or 405; nothing under /admin
    is ever forwarded. Without a `control` every request is 404."""

    @web.middleware
    async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _authorized_and_logged(request, handler, logger)

    app = web.Application(middlewares=[admin_auth])
    if control is not None:
        app[ADMIN_CONTROL] = control
    app.router.add_post("/backends/{name}/{action:" + "|".join(ACTIONS) + "}", backend_action)
    app.router.add_post("/reload", reload_config)
    return app
