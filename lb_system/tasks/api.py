"""The task REST API that every hosted backend serves."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from lb_system.config import ApiConfig
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.problems import ProblemMiddleware, json_response
from lb_system.tasks.models import MAX_ID, TaskFields, TaskPatch
from lb_system.tasks.openapi import task_api_document
from lb_system.tasks.store import StoreUnavailable, TaskStore

TASK_STORE = web.AppKey("task_store", TaskStore)
SERVER_NAME = web.AppKey("server_name", str)

MALFORMED_BODY = "Empty or malformed JSON body"
MAX_JSON_DEPTH = 32
TOO_DEEP = f"JSON body nested deeper than {MAX_JSON_DEPTH} levels"
ModelT = TypeVar("ModelT", bound=BaseModel)


def _bad_request(detail: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=detail)


def _field_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"Unknown field '{field}'"
    if first["type"] == "missing":
        return f"Missing required field '{field}'"
    if first["type"] == "string_pattern_mismatch":
        return f"Invalid field '{field}': must not be blank"
    return f"Invalid field '{field}': {first['msg'].removeprefix('Value error, ')}"


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a non-empty JSON object, or the right 400/413/415."""
    body = await request.read()  # bounded by the app's client_max_size (413 beyond it)
    if not body.strip():
        raise _bad_request(MALFORMED_BODY)
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise web.HTTPUnsupportedMediaType(text=f"Content-Type must be application/json, got {content_type}")
    if _nested_too_deep(body):
        raise _bad_request(TOO_DEEP)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad_request(MALFORMED_BODY) from None
    if not isinstance(data, dict) or not data:
        raise _bad_request(MALFORMED_BODY)
    return data


# A JSON string, closing quote optional and possessive: linear even on unterminated or odd input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _nested_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` opens more than `limit` arrays/objects inside each other, found without
    recursion: the decoder would recurse once per level and fail deep down (RecursionError)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case: too few brackets to be that deep
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_A_BRACKET)
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _task_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    # isascii: str.isdigit also accepts "²", which int() refuses; the length keeps int() cheap.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_ID:
        raise _not_found(raw)
    return int(raw)


def _not_found(task_id: int | str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=f"Task {task_id} not found")


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"Invalid query parameter '{name}': must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _bad_request(f"Invalid query parameter '{name}': must be between {low} and {high}, got {value}")
    return value


DATABASE_UNAVAILABLE = "Database unavailable"


def _database_unavailable() -> web.HTTPServiceUnavailable:
    # Retry-After: the balancer retries an idempotent request elsewhere, a client a second later.
    return web.HTTPServiceUnavailable(text=DATABASE_UNAVAILABLE, headers={"Retry-After": "1"})


@web.middleware
async def database_unavailable_is_503(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A database that does not answer is a 503 with Retry-After, never a 500: nothing is wrong
    with the request, and nothing it asked for was done unless the answer says so."""
    try:
        return await handler(request)
    except StoreUnavailable:
        raise _database_unavailable() from None


async def health(request: web.Request) -> web.Response:
    name = request.app[SERVER_NAME]
    if not await request.app[TASK_STORE].ping():
        raise _database_unavailable()
    return json_response({"status": "ok", "server": name})


async def _validated(request: web.Request, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate(await _json_object(request))
    except ValidationError as error:
        raise _bad_request(_field_error(error)) from None


async def create_task(request: web.Request) -> web.Response:
    fields = await _validated(request, TaskFields)
    task = await request.app[TASK_STORE].create(fields.title, fields.description, fields.done)
    return json_response(task, status=201, headers={"Location": f"/tasks/{task['id']}"})


async def list_tasks(request: web.Request) -> web.Response:
    done_raw = request.query.get("done")
    if done_raw is None:
        done = None
    elif done_raw in ("true", "false"):
        done = done_raw == "true"
    else:
        raise _bad_request(f"Invalid query parameter 'done': must be true or false, got {done_raw!r}")
    limit = _query_int(request, "limit", 100, 1, 1000)
    offset = _query_int(request, "offset", 0, 0, MAX_ID)
    tasks, total = await request.app[TASK_STORE].list(done=done, limit=limit, offset=offset)
    return json_response({"tasks": tasks, "total": total, "limit": limit, "offset": offset})


async def get_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    task = await request.app[TASK_STORE].get(task_id)
    if task is None:
        raise _not_found(task_id)
    return json_response(task)


async def _update(request: web.Request, task_id: int, changes: dict[str, Any]) -> web.Response:
    task = await request.app[TASK_STORE].update(task_id, changes)
    if task is None:
        raise _not_found(task_id)
    return json_response(task)


async def replace_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    fields = await _validated(request, TaskFields)
    return await _update(request, task_id, fields.model_dump())


async def patch_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    patch = await _validated(request, TaskPatch)
    return await _update(request, task_id, patch.model_dump(include=patch.model_fields_set))


async def delete_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    if not await request.app[TASK_STORE].delete(task_id):
        raise _not_found(task_id)
    return web.Response(status=204)


async def crash(request: web.Request) -> web.Response:
    1 / 0  # noqa: B018 - the point of this endpoint: a real unhandled exception
    raise AssertionError("unreachable")


def make_backend_app(
    name: str,
    *,
    store: TaskStore,
    tracker: ErrorTracker,
    api: ApiConfig,
    logger: logging.Logger,
) -> web.Application:
    """One task-API backend; several may share one store and one tracker."""
    app = web.Application(
        middlewares=[ProblemMiddleware(server=name, tracker=tracker, logger=logger), database_unavailable_is_503],
        client_max_size=api.max_body_bytes,
    )
    app[SERVER_NAME] = name
    app[TASK_STORE] = store
    document = json.dumps(task_api_document(debug_endpoints=api.debug_endpoints)).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/health", health)
    app.router.add_post("/tasks", create_task)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_get("/tasks/{id}", get_task)
    app.router.add_put("/tasks/{id}", replace_task)
    app.router.add_patch("/tasks/{id}", patch_task)
    app.router.add_delete("/tasks/{id}", delete_task)
    if api.debug_endpoints:
        app.router.add_get("/debug/crash", crash)
    app.router.add_get("/openapi.json", openapi)
    return app
