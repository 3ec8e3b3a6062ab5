"""The balancer's OpenAPI 3.1 document, as data: its own endpoints, the admin API, and the API of
the backends it forwards to (given by whoever knows them: the balancer does not)."""

from __future__ import annotations

import copy
from typing import Any

from lb_system.problems import (
    ANSWERED_BY_HEADER,
    PROBLEM_SCHEMA,
    REQUEST_ID_HEADER,
    REQUEST_ID_HEADER_SPEC,
    add_response_headers,
    problem_spec,
)
from lb_system.proxy.admin import ACTIONS

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"

_OBJECT = {"type": "object"}
_COUNT = {"type": "integer", "minimum": 0}

# /health's, for the whole balancer and for each pool.
_HEALTH_COUNTS: dict[str, Any] = {
    "status": {"enum": ["ok", "degraded", "unavailable"]},
    "serving_backends": _COUNT,
    "healthy_backends": _COUNT,
    "total_backends": _COUNT,
}

# Only the fields clients rely on are pinned; the documents may grow.
SCHEMAS: dict[str, Any] = {
    "Problem": PROBLEM_SCHEMA,
    "BalancerHealth": {
        "type": "object",
        "required": ["status", "serving_backends", "healthy_backends", "total_backends"],
        "properties": {
            **_HEALTH_COUNTS,
            "pools": {
                "type": "object",
                "description": "with routes or several pools: each pool's own health, counted over its backends",
                "additionalProperties": {"$ref": "#/components/schemas/PoolHealth"},
            },
        },
    },
    "PoolHealth": {
        "type": "object",
        "required": ["status", "serving_backends", "healthy_backends", "total_backends"],
        "properties": _HEALTH_COUNTS,
    },
    "PoolStatus": {
        "type": "object",
        "required": ["name", "status", "strategy", "serving", "healthy", "total", "backends"],
        "properties": {
            "name": {"type": "string"},
            "status": {"enum": ["ok", "degraded", "unavailable"]},
            "strategy": {"type": "string"},
            "serving": _COUNT,
            "healthy": _COUNT,
            "total": _COUNT,
            "backends": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Status": {
        "type": "object",
        "required": ["strategy", "healthy", "total", "backends", "pools", "retiring", "config_error", "loop", "instance"],
        "properties": {
            "strategy": {"type": "string"},
            "healthy": _COUNT,
            "total": _COUNT,
            "backends": {"type": "array", "items": {"$ref": "#/components/schemas/BackendStatus"}},
            "retiring": {"type": "array", "items": {"$ref": "#/components/schemas/BackendStatus"}},
            "pools": {"type": "array", "items": {"$ref": "#/components/schemas/PoolStatus"}},
            "config_error": {"type": ["string", "null"]},
            "loop": {"type": "string", "enum": ["uvloop", "asyncio"], "description": "the event loop this process runs"},
            "instance": {"$ref": "#/components/schemas/Instance"},
        },
    },
    "Instance": {
        "type": "object",
        "description": "the balancer process that answered: several may share one port ([balancer] reuse_port)",
        "required": ["host", "pid"],
        "properties": {"host": {"type": "string"}, "pid": {"type": "integer", "minimum": 1}},
    },
    "BackendStatus": {
        "type": "object",
        "required": ["name", "url", "hosted", "healthy", "admin_state", "pool"],
        "properties": {
            "name": {"type": "string"},
            "pool": {"type": "string"},
            "url": {"type": "string"},
            "hosted": {"type": "boolean"},
            "healthy": {"type": "boolean"},
            "admin_state": {"enum": ["enabled", "disabled", "draining"]},
        },
    },
    "ErrorStats": {
        "type": "object",
        "required": [
            "total_errors",
            "error_types",
            "by_server",
            "recent_errors",
            "since",
            "by_method",
            "windows",
            "top_paths",
            "instance",
        ],
        "properties": {
            "instance": {"$ref": "#/components/schemas/Instance"},
            "total_errors": _COUNT,
            "error_types": {"type": "object", "additionalProperties": _COUNT},
            "by_server": {"type": "object", "additionalProperties": _COUNT},
            "recent_errors": {"type": "array", "items": {"$ref": "#/components/schemas/ErrorRecord"}},
            "since": {"type": "string"},
            "by_method": {"type": "object", "additionalProperties": _COUNT},
            "windows": _OBJECT,
            "top_paths": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["path", "count"],
                    "properties": {"path": {"type": "string"}, "count": _COUNT},
                },
            },
        },
    },
    "ErrorRecord": {
        "type": "object",
        "required": ["timestamp", "status", "type", "method", "path", "server", "detail", "request_id"],
        "properties": {
            "timestamp": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "type": {"type": "string"},
            "method": {"type": "string"},
            "path": {"type": "string"},
            "server": {"type": "string"},
            "detail": {"type": "string"},
            "request_id": {"type": "string"},
            "pool": {"type": ["string", "null"], "description": "with routes or several pools: the request's pool"},
            "route": {"type": "string", "description": "with routes or several pools: the route that matched, or '-'"},
        },
    },
    "ErrorsReset": {
        "type": "object",
        "required": ["reset", "cleared_errors"],
        "properties": {"reset": {"const": True}, "cleared_errors": _COUNT},
    },
    "BackendAction": {
        "type": "object",
        "required": ["action", "backend", "changed", "status"],
        "properties": {
            "action": {"enum": list(ACTIONS)},
            "backend": {"type": "string"},
            "changed": {"type": "boolean"},
            "status": {"$ref": "#/components/schemas/BackendStatus"},
        },
    },
    "Reloaded": {
        "type": "object",
        "required": ["reloaded", "changed", "added", "removed", "edited", "settings", "changes"],
        "properties": {"reloaded": {"const": True}, "changed": {"type": "boolean"}},
    },
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


_ADMIN_REFUSALS = {
    "401": problem_spec("Missing or wrong bearer token"),
    "403": problem_spec("The admin API is off: no token is set on the server"),
}
_ADMIN = {"security": [{"bearerAuth": []}], "tags": ["admin"]}


def _positive_query(name: str, description: str, low: int, high: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": low, "maximum": high}
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _own_paths() -> dict[str, Any]:
    return {
        "/": {
            "get": {
                "operationId": "dashboard",
                "summary": "The live dashboard",
                "responses": {"200": _text("text/html", "HTML page")},
            }
        },
        "/events": {
            "get": {
                "operationId": "events",
                "summary": "Server-Sent Events feeding the dashboard (an endless stream)",
                "responses": {
                    "200": _text("text/event-stream", "A snapshot event, then updates"),
                    "503": problem_spec("Shutting down"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition",
                "responses": {"200": _text("text/plain", "Prometheus metrics")},
            }
        },
        "/health": {
            "get": {
                "operationId": "balancerHealth",
                "summary": "All, some or none of the backends up",
                "responses": {
                    "200": _json("BalancerHealth", "Some or all backends serve"),
                    "503": _json("BalancerHealth", "No backend serves: status is unavailable"),
                },
            }
        },
        "/status": {
            "get": {
                "operationId": "status",
                "summary": "Every backend's state, latency and error rate",
                "responses": {"200": _json("Status", "The pool's state")},
            }
        },
        "/errors/stats": {
            "get": {
                "operationId": "errorStats",
                "summary": "Error counters and recent errors (the filters apply to recent_errors)",
                "parameters": [
                    {"name": "server", "in": "query", "schema": {"type": "string", "minLength": 1}},
                    _positive_query("status", "Only errors with this status", 400, 599),
                    _positive_query("limit", "At most this many recent errors", 1, 999_999),
                ],
                "responses": {"200": _json("ErrorStats", "Error statistics"), "400": problem_spec("An invalid query parameter")},
            },
            "delete": {
                "operationId": "resetErrorStats",
                "summary": "Reset the error counters (admin)",
                **_ADMIN,
                "responses": {"200": _json("ErrorsReset", "Counters reset"), **_ADMIN_REFUSALS},
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapiDocument",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": _OBJECT}}}},
            }
        },
    }


def _admin_paths() -> dict[str, Any]:
    return {
        "/admin/backends/{name}/{action}": {
            "post": {
                "operationId": "backendAction",
                "summary": "Disable, enable, drain, stop or start a backend",
                **_ADMIN,
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}},
                    {"name": "action", "in": "path", "required": True, "schema": {"enum": list(ACTIONS)}},
                ],
                "responses": {
                    "200": _json("BackendAction", "Done (or already so: changed is false)"),
                    "404": problem_spec("No backend with this name"),
                    "409": problem_spec("Not possible now, or not for an outside backend"),
                    **_ADMIN_REFUSALS,
                },
            }
        },
        "/admin/reload": {
            "post": {
                "operationId": "reload",
                "summary": "Apply the saved config file now",
                **_ADMIN,
                "responses": {
                    "200": _json("Reloaded", "What the reload changed"),
                    "400": problem_spec("The file is invalid or needs a restart; nothing was applied"),
                    **_ADMIN_REFUSALS,
                },
            }
        },
    }


_ANSWERED_BY = {
    "description": "The backend that answered, or `balancer` for the balancer's own answers",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}

# What the balancer itself may answer on a forwarded request when no backend can.
_FORWARDING_ANSWERS = {
    "502": problem_spec("No backend answered"),
    "503": problem_spec("No healthy backend, or too many requests waiting for one"),
    "504": problem_spec("The backend did not answer in time"),
}


def balancer_document(forwarded: dict[str, Any] | None = None, *, admin: bool = True) -> dict[str, Any]:
    """The balancer's document. `forwarded` is the backends' API: its paths are served through the
    balancer, except those the balancer answers itself (its own /health wins over a backend's)."""
    forwarded = copy.deepcopy(forwarded) if forwarded is not None else {"paths": {}, "components": {"schemas": {}}}
    paths: dict[str, Any] = {}
    for path, item in forwarded["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                operation["responses"] = {**_FORWARDING_ANSWERS, **operation["responses"]}
        paths[path] = item
    paths.update(_own_paths())
    if admin:
        paths.update(_admin_paths())
    add_response_headers(paths, {REQUEST_ID_HEADER: REQUEST_ID_HEADER_SPEC, ANSWERED_BY_HEADER: _ANSWERED_BY})
    info = forwarded.get("info", {})
    return copy.deepcopy(
        {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "lb_system balancer",
                "version": info.get("version", "1.0.0"),
                "description": f"The balancer's own endpoints, and {info.get('title', 'nothing else')} forwarded.",
            },
            "paths": paths,
            "components": {
                "schemas": {**forwarded["components"]["schemas"], **SCHEMAS},
                "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            },
        }
    )
