"""The task API's OpenAPI 3.1 document, as data. Request bodies come from the pydantic models
the handlers validate with, so the document cannot drift from what the API accepts."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from lb_system.problems import PROBLEM_SCHEMA, REQUEST_ID_HEADER, REQUEST_ID_HEADER_SPEC, add_response_headers, problem_spec
from lb_system.tasks.models import MAX_ID, TaskFields, TaskPatch

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
_REF = "#/components/schemas/{model}"

TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "title", "description", "done", "created_at", "updated_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
        "title": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": {"type": "string", "maxLength": 2000},
        "done": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}

TASK_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["tasks", "total", "limit", "offset"],
    "additionalProperties": False,
    "properties": {
        "tasks": {"type": "array", "items": {"$ref": _REF.format(model="Task")}},
        "total": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "offset": {"type": "integer", "minimum": 0},
    },
}

BACKEND_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "server"],
    "properties": {"status": {"const": "ok"}, "server": {"type": "string"}},
}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema without pydantic's `default: null` for fields that may only be omitted."""
    schema = model.model_json_schema(ref_template=_REF)
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None:
            del field["default"]
    return schema


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": _REF.format(model=schema_name)}}}}


_ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    # Any other id (not digits, or past SQLite's range) is a 404, like an id never used.
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
}
_TASK_LINKS = {
    "GetTask": {"operationId": "getTask", "parameters": {"id": "$response.body#/id"}},
    "ReplaceTask": {"operationId": "replaceTask", "parameters": {"id": "$response.body#/id"}},
    "PatchTask": {"operationId": "patchTask", "parameters": {"id": "$response.body#/id"}},
    "DeleteTask": {"operationId": "deleteTask", "parameters": {"id": "$response.body#/id"}},
}
_BODY_ERRORS = {
    "400": problem_spec("Empty or malformed JSON body, or a missing, invalid or unknown field"),
    "413": problem_spec("Body over [api] max_body_bytes"),
    "415": problem_spec("Content-Type is not JSON"),
}
_NOT_FOUND = {"404": problem_spec("No task with this id")}


def _body(model_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": {"$ref": _REF.format(model=model_name)}}}}


def _query_integer(name: str, low: int, high: int, *, default: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": low, "maximum": high, "default": default}
    return {"name": name, "in": "query", "schema": schema}


def _task_paths(debug_endpoints: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "backendHealth",
                "summary": "The backend's own health (its database answers)",
                "responses": {
                    "200": _json("BackendHealth", "The backend and its database are up"),
                    "503": problem_spec("The database does not answer"),
                },
            }
        },
        "/tasks": {
            "post": {
                "operationId": "createTask",
                "summary": "Create a task",
                "requestBody": _body("TaskFields"),
                "responses": {
                    "201": {
                        **_json("Task", "The created task"),
                        "headers": {"Location": {"schema": {"type": "string"}, "required": True}},
                        "links": _TASK_LINKS,
                    },
                    **_BODY_ERRORS,
                },
            },
            "get": {
                "operationId": "listTasks",
                "summary": "List tasks in id order",
                "parameters": [
                    {"name": "done", "in": "query", "schema": {"type": "boolean"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0},
                    },
                ],
                "responses": {
                    "200": _json("TaskList", "One page of tasks"),
                    "400": problem_spec("An invalid query parameter"),
                },
            },
        },
        "/tasks/{id}": {
            "parameters": [_ID_PARAMETER],
            "get": {
                "operationId": "getTask",
                "summary": "Read a task",
                "responses": {"200": {**_json("Task", "The task"), "links": _TASK_LINKS}, **_NOT_FOUND},
            },
            "put": {
                "operationId": "replaceTask",
                "summary": "Replace a task's fields",
                "requestBody": _body("TaskFields"),
                "responses": {"200": {**_json("Task", "The updated task"), "links": _TASK_LINKS}, **_BODY_ERRORS, **_NOT_FOUND},
            },
            "patch": {
                "operationId": "patchTask",
                "summary": "Update some of a task's fields",
                "requestBody": _body("TaskPatch"),
                "responses": {"200": {**_json("Task", "The updated task"), "links": _TASK_LINKS}, **_BODY_ERRORS, **_NOT_FOUND},
            },
            "delete": {
                "operationId": "deleteTask",
                "summary": "Delete a task",
                "responses": {
                    "204": {
                        "description": "Deleted",
                        "links": {"GetDeletedTask": {"operationId": "getTask", "parameters": {"id": "$request.path.id"}}},
                    },
                    **_NOT_FOUND,
                },
            },
        },
    }
    if debug_endpoints:
        paths["/debug/crash"] = {
            "get": {
                "operationId": "crash",
                "summary": "Divides by zero on purpose (only with [api] debug_endpoints)",
                "responses": {"500": problem_spec("Always: an unhandled error, without its traceback")},
            }
        }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapiDocument",
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
        }
    }
    return paths


def task_api_document(*, debug_endpoints: bool) -> dict[str, Any]:
    """The OpenAPI document of one task-API backend (a fresh copy: callers may change it)."""
    schemas = {
        "Problem": PROBLEM_SCHEMA,
        "Task": TASK_SCHEMA,
        "TaskList": TASK_LIST_SCHEMA,
        "TaskFields": model_schema(TaskFields),
        "TaskPatch": model_schema(TaskPatch),
        "BackendHealth": BACKEND_HEALTH_SCHEMA,
    }
    paths = copy.deepcopy(_task_paths(debug_endpoints))
    add_response_headers(paths, {REQUEST_ID_HEADER: REQUEST_ID_HEADER_SPEC})
    return copy.deepcopy(
        {
            "openapi": OPENAPI_VERSION,
            "info": {"title": "lb_system task API", "version": "1.0.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }
    )
