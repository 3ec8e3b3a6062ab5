"""/openapi.json: a valid OpenAPI 3.1 document that lists every route the apps serve, and no other."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from openapi_spec_validator import validate

from lb_system import System
from lb_system.proxy.openapi import balancer_document
from lb_system.tasks.models import TaskFields, TaskPatch
from lb_system.tasks.openapi import task_api_document

# The catch-all routes whatever no other route takes to a backend: no operation of its own.
CATCH_ALLS = {"/{proxied_path}"}
# aiohttp answers HEAD wherever it answers GET; the document lists the GETs.
IMPLIED = {"HEAD"}


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(path template, lower-case method) of every route in the app's router."""
    operations = set()
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:  # a sub-application (the admin API): its routes carry the prefix already
            operations |= routed_operations(info["app"])
            continue
        path = info.get("path") or info["formatter"]
        if path in CATCH_ALLS:
            continue
        for route in resource:
            if route.method not in IMPLIED:
                operations.add((path, route.method.lower()))
    return operations


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item if method != "parameters"}


async def fetch_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        return await response.json()


async def test_balancer_and_backends_serve_a_valid_document_of_every_route(make_config, start_system, http) -> None:
    system: System = await start_system(make_config())
    served = await fetch_json(http, f"{system.balancer_url}/openapi.json")
    validate(served)
    assert served["openapi"].startswith("3.1")
    assert served == balancer_document(task_api_document(debug_endpoints=True))

    assert system.balancer is not None
    routes = routed_operations(system.balancer.app)
    for hosted in system.hosted.values():
        assert hosted.runner is not None
        routes |= routed_operations(hosted.runner.app)
        backend_document = await fetch_json(http, f"{hosted.url}/openapi.json")
        validate(backend_document)
        assert documented_operations(backend_document) == routed_operations(hosted.runner.app)
    assert routes == documented_operations(served)


async def test_the_document_follows_debug_endpoints(make_config, start_system, http) -> None:
    system = await start_system(make_config(api={"debug_endpoints": False}))
    served = await fetch_json(http, f"{system.balancer_url}/openapi.json")
    validate(served)
    assert "/debug/crash" not in served["paths"]
    async with http.get(f"{system.balancer_url}/debug/crash") as response:
        assert response.status == 404


def test_request_bodies_are_the_pydantic_models_schemas() -> None:
    document = balancer_document(task_api_document(debug_endpoints=True))
    schemas = document["components"]["schemas"]
    for model in (TaskFields, TaskPatch):
        generated = model.model_json_schema()
        assert schemas[model.__name__]["properties"].keys() == generated["properties"].keys()
        assert schemas[model.__name__]["additionalProperties"] is False
        for name, field in generated["properties"].items():
            assert {k: v for k, v in field.items() if v is not None} == schemas[model.__name__]["properties"][name]
    body = document["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/TaskFields"}


def test_errors_share_one_problem_schema_and_admin_needs_a_bearer_token() -> None:
    document = balancer_document(task_api_document(debug_endpoints=True))
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            admin = path.startswith("/admin/") or (path, method) == ("/errors/stats", "delete")
            assert (operation.get("security") == [{"bearerAuth": []}]) == admin, (path, method)
            for status, response in operation["responses"].items():
                # The balancer's /health answers its own document with 503: probes read the code.
                if int(status) >= 400 and path != "/health":
                    assert response["content"] == {
                        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                    }, (path, method, status)


def test_a_balancer_without_admin_documents_no_admin_api() -> None:
    document = balancer_document(None, admin=False)
    validate(document)
    assert not any(path.startswith("/admin") for path in document["paths"])
    assert "/tasks" not in document["paths"]
