"""The task REST API of one backend, over a real socket, on a real SQLite file and on a real
PostgreSQL database (every test runs on both: the `make_store` parameter)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from lb_system import ErrorTracker, make_backend_app
from lb_system.config import ApiConfig
from lb_system.tasks.openapi import task_api_document

PROBLEM = "application/problem+json"


@pytest.fixture
async def store(make_store):
    store = make_store()
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def tracker() -> ErrorTracker:
    return ErrorTracker(50)


@pytest.fixture
async def client(aiohttp_client, store, tracker) -> TestClient:
    app = make_backend_app(
        "backend-1", store=store, tracker=tracker, api=ApiConfig(max_body_bytes=4096), logger=logging.getLogger("t")
    )
    return await aiohttp_client(app)


async def assert_problem(response, status: int, detail: str | None = None) -> dict:
    assert response.status == status
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["instance"] == response.url.path
    assert body["request_id"] == response.headers["X-Request-ID"]
    if detail is not None:
        assert body["detail"] == detail
    return body


async def test_health_names_the_server(client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "server": "backend-1"}


async def test_health_is_503_when_the_database_is_gone(client, store) -> None:
    await store.close()
    await assert_problem(await client.get("/health"), 503)


async def test_create_returns_201_location_and_the_task(client) -> None:
    response = await client.post("/tasks", json={"title": "  Write tests  ", "description": "real ones"})
    assert response.status == 201
    task = await response.json()
    assert response.headers["Location"] == f"/tasks/{task['id']}"
    assert task["title"] == "Write tests"
    assert task["description"] == "real ones"
    assert task["done"] is False
    assert task["created_at"].endswith("Z") and task["created_at"] == task["updated_at"]


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"{not json", b"[]", b"{}", b'"a string"', b"null", b"\xff\xfe"],
    ids=["empty", "blank", "malformed", "array", "empty-object", "string", "null", "not-utf8"],
)
async def test_bad_json_bodies_are_400_empty_or_malformed(client, body: bytes) -> None:
    response = await client.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    await assert_problem(response, 400, "Empty or malformed JSON body")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"description": "no title"}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": 5}, "title"),
        ({"title": "ok", "description": "d" * 2001}, "description"),
        ({"title": "ok", "done": "yes"}, "done"),
        ({"title": "ok", "description": "nul \x00 inside"}, "description"),
        ({"title": "ok", "owner": "me"}, "owner"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(client, body: dict, field: str) -> None:
    problem = await assert_problem(await client.post("/tasks", json=body), 400)
    assert f"'{field}'" in problem["detail"]


@pytest.mark.parametrize(
    "body",
    [b"[" * 3000, b'{"title": ' + b"[" * 33 + b"]" * 33 + b"}", b'{"title": "x", "d": ' + b'{"a": ' * 40 + b"1" + b"}" * 41],
    ids=["3000-deep-open", "33-deep-array", "40-deep-object"],
)
async def test_bodies_nested_deeper_than_32_levels_are_400_never_500(client, tracker, body: bytes) -> None:
    response = await client.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    await assert_problem(response, 400, "JSON body nested deeper than 32 levels")
    assert tracker.stats()["error_types"]["500_INTERNAL_ERROR"] == 0


async def test_brackets_inside_strings_and_32_levels_are_not_too_deep(client) -> None:
    title = "[{" * 40 + '\\"[' * 10
    response = await client.post("/tasks", data=f'{{"title": "{title}"}}', headers={"Content-Type": "application/json"})
    assert response.status == 201, await response.text()
    nested = b'{"title": ' + b"[" * 31 + b'"x"' + b"]" * 31 + b"}"  # 32 levels with the object: not too deep
    response = await client.post("/tasks", data=nested, headers={"Content-Type": "application/json"})
    await assert_problem(response, 400)
    assert "nested" not in (await response.json(content_type=PROBLEM))["detail"]


async def test_non_json_content_type_is_415(client) -> None:
    response = await client.post("/tasks", data="title=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    await assert_problem(response, 415)


async def test_body_over_max_body_bytes_is_413(client) -> None:
    response = await client.post("/tasks", json={"title": "x", "description": "d" * 5000})
    await assert_problem(response, 413)


async def test_get_unknown_task_is_404_with_detail(client) -> None:
    await assert_problem(await client.get("/tasks/999999"), 404, "Task 999999 not found")
    await assert_problem(await client.get("/tasks/abc"), 404, "Task abc not found")


async def test_list_filters_pages_and_counts_in_id_order(client) -> None:
    for index in range(5):
        await client.post("/tasks", json={"title": f"t{index}", "done": index % 2 == 0})
    body = await (await client.get("/tasks")).json()
    assert [t["title"] for t in body["tasks"]] == ["t0", "t1", "t2", "t3", "t4"]
    assert (body["total"], body["limit"], body["offset"]) == (5, 100, 0)
    done = await (await client.get("/tasks", params={"done": "true", "limit": "2", "offset": "1"})).json()
    assert [t["title"] for t in done["tasks"]] == ["t2", "t4"]
    assert (done["total"], done["limit"], done["offset"]) == (3, 2, 1)
    beyond = await (await client.get("/tasks", params={"offset": "10"})).json()
    assert beyond["tasks"] == [] and beyond["total"] == 5


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ({"done": "maybe"}, "done"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ],
)
async def test_bad_query_values_are_400_naming_them(client, query: dict, name: str) -> None:
    problem = await assert_problem(await client.get("/tasks", params=query), 400)
    assert f"'{name}'" in problem["detail"]


async def test_put_replaces_and_patch_updates_a_subset(client) -> None:
    task = await (await client.post("/tasks", json={"title": "a", "description": "keep?", "done": True})).json()
    replaced = await client.put(f"/tasks/{task['id']}", json={"title": "b"})
    assert replaced.status == 200
    body = await replaced.json()
    assert (body["title"], body["description"], body["done"]) == ("b", "", False)
    patched = await (await client.patch(f"/tasks/{task['id']}", json={"done": True})).json()
    assert (patched["title"], patched["done"]) == ("b", True)
    assert patched["updated_at"] >= patched["created_at"]
    await assert_problem(await client.put(f"/tasks/{task['id']}", json={"done": True}), 400)
    await assert_problem(await client.patch(f"/tasks/{task['id']}", json={"title": None}), 400)
    await assert_problem(await client.patch("/tasks/424242", json={"done": True}), 404, "Task 424242 not found")


async def test_delete_is_204_then_404(client) -> None:
    task = await (await client.post("/tasks", json={"title": "gone soon"})).json()
    response = await client.delete(f"/tasks/{task['id']}")
    assert response.status == 204
    assert await response.read() == b""
    await assert_problem(await client.delete(f"/tasks/{task['id']}"), 404)
    await assert_problem(await client.get(f"/tasks/{task['id']}"), 404)


async def test_crash_is_500_without_traceback_and_logged(client, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="t"):
        response = await client.get("/debug/crash")
        problem = await assert_problem(response, 500, "Internal server error")
    assert "ZeroDivisionError" not in str(problem)
    assert any("ZeroDivisionError" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_crash_endpoint_is_404_when_debug_endpoints_are_off(aiohttp_client, store, tracker) -> None:
    app = make_backend_app("b", store=store, tracker=tracker, api=ApiConfig(debug_endpoints=False), logger=logging.getLogger("t"))
    client = await aiohttp_client(app)
    await assert_problem(await client.get("/debug/crash"), 404)


async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(client) -> None:
    await assert_problem(await client.get("/nope"), 404)
    response = await client.post("/tasks/1", json={"title": "x"})
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].split(",")) >= {"GET", "PUT", "PATCH", "DELETE"}


async def test_every_failed_request_is_recorded_once(client, tracker) -> None:
    await client.post("/tasks", data=b"", headers={"Content-Type": "application/json"})
    await client.get("/tasks/999999")
    await client.get("/debug/crash")
    await client.get("/tasks")
    stats = tracker.stats()
    assert stats["total_errors"] == 3
    assert stats["error_types"]["400_BAD_REQUEST"] == 1
    assert stats["error_types"]["404_NOT_FOUND"] == 1
    assert stats["error_types"]["500_INTERNAL_ERROR"] == 1
    assert stats["by_server"] == {"backend-1": 3}
    newest = stats["recent_errors"][0]
    assert (newest["status"], newest["path"], newest["method"]) == (500, "/debug/crash", "GET")


async def test_client_request_id_is_kept_when_valid_and_replaced_otherwise(client) -> None:
    kept = await client.get("/tasks/5", headers={"X-Request-ID": "abc.DEF_123-x"})
    assert kept.headers["X-Request-ID"] == "abc.DEF_123-x"
    for bad in ("has space", "x" * 129, "semi;colon"):
        replaced = await client.get("/tasks/5", headers={"X-Request-ID": bad})
        assert replaced.headers["X-Request-ID"] != bad
        assert 1 <= len(replaced.headers["X-Request-ID"]) <= 128


async def test_concurrent_creation_gives_unique_ids(client) -> None:
    responses = await asyncio.gather(*(client.post("/tasks", json={"title": f"t{i}"}) for i in range(50)))
    ids = [(await r.json())["id"] for r in responses]
    assert all(r.status == 201 for r in responses)
    assert len(set(ids)) == 50


async def test_tasks_survive_a_restart_of_the_store(make_store) -> None:
    store = make_store()
    await store.open()
    created = await store.create("persist me")
    await store.close()
    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.get(created["id"]) == created
    finally:
        await reopened.close()


@pytest.mark.parametrize("raw", ["%C2%B2", "1" * 5000, "9" * 20], ids=["superscript-two", "5000-digits", "beyond-int64"])
async def test_odd_task_ids_are_404_not_500(client, tracker, raw: str) -> None:
    response = await client.get(f"/tasks/{raw}")
    await assert_problem(response, 404)
    assert tracker.stats()["error_types"]["500_INTERNAL_ERROR"] == 0


async def test_a_failure_after_streaming_started_cuts_the_connection_instead_of_a_second_response(
    aiohttp_server, tracker
) -> None:
    from aiohttp import web

    from lb_system.problems import ProblemMiddleware

    async def half_then_crash(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"12345")
        raise RuntimeError("boom")

    app = web.Application(middlewares=[ProblemMiddleware(server="s", tracker=tracker, logger=logging.getLogger("t"))])
    app.router.add_get("/half", half_then_crash)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    writer.close()
    await writer.wait_closed()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"HTTP/1.1") == 1, "no second status line after the body started"
    assert not received.endswith(b"0\r\n\r\n"), "the cut body must not look complete"


# NUL: PostgreSQL's text cannot hold it, so neither store takes it (and the schema says so).
BLANK_EDGE_TITLES = [
    *["x", " x ", "\v", " \t\r\n\f", "\u3000", "\x85", "\x1c", "\ufeff", " " + "a" * 200, "a" * 200, "a" * 201],
    *["a\x00b", "\x00"],
]


@pytest.mark.parametrize("title", BLANK_EDGE_TITLES, ids=[repr(t)[:12] for t in BLANK_EDGE_TITLES])
async def test_a_title_is_accepted_exactly_when_the_openapi_schema_says_it_is_valid(client, title: str) -> None:
    # Schemathesis found "\v": blank to the API, valid to the document. Both now use one set of blanks.
    document = task_api_document(debug_endpoints=False)
    schema = {**document["components"]["schemas"]["TaskFields"], "$defs": document["components"]["schemas"]}
    valid = Draft202012Validator(schema).is_valid({"title": title})
    response = await client.post("/tasks", json={"title": title})
    assert response.status == (201 if valid else 400), (title, valid)
    if valid:
        assert (await response.json())["title"] == title.strip(" \t\n\r\f\v")
    else:
        await assert_problem(response, 400)
