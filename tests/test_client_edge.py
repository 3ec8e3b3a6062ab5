"""The balancer's client-facing edge: what a client can send that no backend must pay for.
Raw sockets where a well-behaved client library would refuse to misbehave."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.backends import FakeBackend
from support.waiting import wait_for

from lb_system.proxy.targets import resolved_path

PROBLEM = "application/problem+json"


@pytest.fixture
async def hosted(make_config, start_system):
    """A system with its two hosted task backends; one failed proxied request would eject a backend."""
    return await start_system(make_config(health={"interval": 60.0, "passive_fall": 1, "passive_5xx": True}))


@pytest.fixture
def fronted(outside_backend, make_config, start_system):
    """A system in front of one outside backend that counts what reaches it (`hits`)."""

    async def start(**sections) -> tuple:
        backend: FakeBackend = await outside_backend("counted")
        sections.setdefault("health", {"interval": 60.0, "passive_fall": 1})
        system = await start_system(make_config(backends=[{"name": "counted", "url": backend.url}], **sections))
        return system, backend

    return start


def address(system) -> tuple[str, int]:
    host, port = system.balancer_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class RawAnswer:
    """One answer read off a raw socket up to the connection's end."""

    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def problem(self) -> dict:
        assert self.headers.get("content-type") == PROBLEM, self.headers
        return json.loads(self.body)


async def exchange(system, data: bytes, *, timeout: float = 5.0) -> RawAnswer:
    """Send raw bytes, read until the balancer closes the connection."""
    reader, writer = await asyncio.open_connection(*address(system))
    try:
        writer.write(data)
        return RawAnswer(await asyncio.wait_for(reader.read(), timeout))
    finally:
        writer.close()


async def scrape(http: aiohttp.ClientSession, system, name: str = "lb_requests_total") -> dict[tuple[str, ...], float]:
    """Nonzero samples of `name` with backend="balancer", keyed by their other labels' values."""
    async with http.get(system.balancer_url + "/metrics") as response:
        text = await response.text()
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("backend") == "balancer" and sample.value:
                found[tuple(v for k, v in sorted(sample.labels.items()) if k != "backend")] = sample.value
    return found


async def error_stats(http: aiohttp.ClientSession, system) -> dict:
    async with http.get(system.balancer_url + "/errors/stats?limit=2000") as response:
        return await response.json()


# --- bodies the task API must refuse without a 5xx --------------------------------------------


async def test_a_100000_deep_json_body_is_400_and_ejects_nothing(hosted, http) -> None:
    for _ in range(3):
        async with http.post(
            hosted.balancer_url + "/tasks", data=b"[" * 100_000, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
            assert response.content_type == PROBLEM
    assert all(b.healthy and b.consecutive_failures == 0 for b in hosted.pool.backends)


# --- refusals before routing: answered, counted, logged, never forwarded -------------------------

SMUGGLING = {
    "cl_and_te": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_cl": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "two_equal_cl": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_list": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd",
    "cl_plus": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
    "cl_negative": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\nabcd",
    "te_xchunked": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_chunked_identity": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_twice": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk_size_not_hex": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1g\r\nx\r\n0\r\n\r\n",
    "chunk_size_negative": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\n0\n\n",
    "obs_fold": b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare_lf": b"GET /x HTTP/1.1\nHost: x\n\n",
    "invalid_method": b"G@T /x HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul_in_value": b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "oversized_field": b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
}


async def test_the_18_smuggling_payloads_are_refused_counted_logged_and_never_forwarded(fronted, http, lb_log) -> None:
    assert len(SMUGGLING) == 18
    system, backend = await fronted()
    for name, payload in SMUGGLING.items():
        answer = await exchange(system, payload)
        assert answer.status in (400, 431), name
        assert answer.headers["x-backend"] == "balancer"
        problem = answer.problem()
        assert problem["status"] == answer.status and problem["request_id"] == answer.headers["x-request-id"]
    assert backend.hits == 0, "nothing was forwarded"
    assert system.pool.get("counted").consecutive_failures == 0

    stats = await error_stats(http, system)
    assert stats["by_server"] == {"balancer": 18}
    assert len([e for e in stats["recent_errors"] if e["server"] == "balancer"]) == 18
    assert sum((await scrape(http, system)).values()) == 18
    assert sum((await scrape(http, system, "lb_errors_total")).values()) == 18
    lines = [m for m in lb_log.messages() if m.startswith("access ") and " reason=" in m]
    assert len(lines) == 18
    assert all("client=127.0.0.1" in line for line in lines)
    assert sum("reason=bad_method" in line for line in lines) == 1
    assert sum("reason=line_too_long" in line for line in lines) == 1


async def test_a_header_section_over_max_header_section_bytes_is_431_and_not_forwarded(fronted) -> None:
    system, backend = await fronted(proxy={"max_header_section_bytes": 16384})
    head = b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)) + b"\r\n"
    answer = await exchange(system, head)
    assert answer.status == 431
    assert answer.problem()["detail"] == "Request header section too large"
    # Under the cap, the same headers pass.
    small = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"X-1: " + b"v" * 1000 + b"\r\n\r\n"
    assert (await exchange(system, small)).status == 200
    assert backend.hits == 1


async def test_an_800_kb_header_section_arriving_in_pieces_is_431(fronted) -> None:
    system, backend = await fronted()
    reader, writer = await asyncio.open_connection(*address(system))
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(100):
            writer.write(b"X-%d: %s\r\n" % (i, b"v" * 8000))
            await writer.drain()
    except ConnectionError:
        pass  # refused while still sending
    answer = RawAnswer(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert answer.status == 431
    assert backend.hits == 0


async def test_a_header_section_not_finished_in_header_timeout_is_408_and_closed(fronted, http, lb_log) -> None:
    system, backend = await fronted(proxy={"header_timeout": 0.3})
    reader, writer = await asyncio.open_connection(*address(system))
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    answer = RawAnswer(await asyncio.wait_for(reader.read(), 5))  # read() ends: the balancer closed
    writer.close()
    assert answer.status == 408
    assert answer.problem()["detail"] == "Request header section not received in time"
    assert backend.hits == 0
    stats = await error_stats(http, system)
    assert stats["by_server"] == {"balancer": 1} and stats["error_types"]["408_REQUEST_TIMEOUT"] == 1
    assert await scrape(http, system) == {("408", "OTHER"): 1.0}
    assert await scrape(http, system, "lb_errors_total") == {("408", "408_REQUEST_TIMEOUT"): 1.0}
    assert any("reason=header_timeout" in m and "client=127.0.0.1" in m for m in lb_log.messages())


async def test_a_stalled_body_is_408_after_body_timeout_and_no_backend_failure(fronted, http, lb_log) -> None:
    system, backend = await fronted(proxy={"body_timeout": 0.3})
    answer = await exchange(system, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
    assert answer.status == 408
    assert answer.problem()["detail"] == "Request body stalled: nothing received for too long"
    assert backend.hits == 0
    counted = system.pool.get("counted")
    assert counted.healthy and counted.consecutive_failures == 0
    assert (await error_stats(http, system))["by_server"] == {"balancer": 1}
    assert any("reason=body_timeout" in m for m in lb_log.messages())


async def test_a_streamed_body_that_stalls_is_408_and_not_the_backends_failure(fronted, http) -> None:
    system, backend = await fronted(proxy={"body_timeout": 0.3})
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"  # over the buffer limit: streamed
    answer = await exchange(system, head + b"x" * 1000)
    assert answer.status == 408
    counted = system.pool.get("counted")
    assert counted.healthy and counted.consecutive_failures == 0
    assert (await error_stats(http, system))["by_server"] == {"balancer": 1}


async def test_request_timeout_bounds_an_upload_that_keeps_trickling(fronted) -> None:
    system, backend = await fronted(proxy={"body_timeout": 5.0, "request_timeout": 0.5})
    reader, writer = await asyncio.open_connection(*address(system))
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")

    async def trickle() -> None:
        for _ in range(1000):
            writer.write(b"x")
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        answer = RawAnswer(await asyncio.wait_for(reader.read(), 5))
    finally:
        dripping.cancel()
        writer.close()
    assert answer.status == 408
    assert answer.problem()["detail"] == "Request body not received within the request timeout"
    assert backend.hits == 0


def _enough_file_descriptors(needed: int) -> None:
    resource = pytest.importorskip("resource")  # POSIX: Windows has no descriptor limit to raise
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_1200_stalled_uploads_do_not_starve_a_normal_client(fronted, http) -> None:
    _enough_file_descriptors(4096)  # both ends of 1,200 connections live in this process
    # Default caps: 100 connections + 1,000 pending. Today's main counted an upload in progress against them.
    system, backend = await fronted(proxy={"body_timeout": 3.0})
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stall() -> None:
        reader, writer = await asyncio.open_connection(*address(system))
        writer.write(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        stalled.append((reader, writer))

    try:
        for _ in range(6):
            await asyncio.gather(*(stall() for _ in range(200)))
        server = system.balancer_runner.server
        await wait_for(lambda: server.requests_count >= 1200, timeout=20, message="1,200 uploads in progress")
        async with http.get(system.balancer_url + "/x") as response:
            assert response.status == 200, await response.text()
        async with http.post(system.balancer_url + "/x", data=b"a normal upload") as response:
            assert response.status == 200
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 20) for reader, _ in stalled))
    finally:
        for _, writer in stalled:
            writer.close()
    assert {RawAnswer(a).status for a in answers} == {408}
    assert backend.hits == 2
    counted = system.pool.get("counted")
    assert counted.healthy and counted.consecutive_failures == 0
    assert (await error_stats(http, system))["error_types"]["408_REQUEST_TIMEOUT"] == 1200


# --- request targets: absolute-form forwarded, the rest refused without blaming anyone ----------


async def test_absolute_form_is_forwarded_in_origin_form_with_host_from_the_target(fronted) -> None:
    system, backend = await fronted()
    for _ in range(3):
        answer = await exchange(
            system, b"GET http://example.com:8081/tasks?x=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n"
        )
        assert answer.status == 200
        seen = json.loads(answer.body)
        assert seen["path"] == "/tasks?x=1"
        assert seen["headers"]["Host"] == "example.com:8081"
    counted = system.pool.get("counted")
    assert counted.healthy and counted.consecutive_failures == 0 and backend.hits == 3
    # An empty path is "/": here the balancer's own page, as the origin-form "/" would be.
    answer = await exchange(system, b"GET http://example.com HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
    assert answer.status == 200 and answer.headers["x-backend"] == "balancer"


@pytest.mark.parametrize(
    "request_line",
    [
        b"CONNECT example.com:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET ftp://example.com/tasks HTTP/1.1",
        b"GET http://user:secret@example.com/tasks HTTP/1.1",
    ],
    ids=["connect", "asterisk", "ftp", "userinfo"],
)
async def test_a_target_that_cannot_be_forwarded_is_400_and_no_backends_failure(fronted, http, lb_log, request_line) -> None:
    system, backend = await fronted()
    answer = await exchange(system, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.status == 400
    assert answer.problem()["detail"].startswith("Request target cannot be forwarded")
    assert backend.hits == 0
    assert system.pool.get("counted").consecutive_failures == 0
    assert (await error_stats(http, system))["by_server"] == {"balancer": 1}
    assert sum((await scrape(http, system)).values()) == 1
    (line,) = [m for m in lb_log.messages() if m.startswith("access ")]
    assert " status=400 " in line and "reason=bad_target" in line


# --- the admin namespace and the balancer's own endpoints are never forwarded --------------------

ADMIN_SPELLINGS = [
    b"/x/../admin/backends/counted/disable",
    b"/x/%2e%2e/admin/backends/counted/disable",
    b"/x/%2E%2E/admin/backends/counted/disable",
    b"/x/.%2e/admin/backends/counted/disable",
    b"/./admin/backends/counted/disable",
    b"/x/..%2fadmin/backends/counted/disable",
    b"/x%2f..%2fadmin/backends/counted/disable",
    b"/x\\..\\admin/backends/counted/disable",
    b"//admin/backends/counted/disable",
    b"/admin%2fbackends/counted/disable",
    b"http://example.com/x/../admin/backends/counted/disable",
]
OWN_SPELLINGS = [b"/x/../errors/stats", b"/x/%2e%2e/health", b"/x/./../metrics", b"/x/../openapi.json", b"/x/../status", b"/x/.."]


async def test_a_path_that_resolves_to_the_balancers_own_never_reaches_a_backend(fronted, lb_log) -> None:
    system, backend = await fronted()
    for target in ADMIN_SPELLINGS + OWN_SPELLINGS:
        head = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        answer = await exchange(system, head)
        assert answer.status == 400, target
        assert answer.problem()["detail"] == "The path resolves to the balancer's own endpoint: not forwarded"
        assert backend.hits == 0, f"the backend saw {target!r}"
    assert system.pool.get("counted").admin_state == "enabled"
    lines = [m for m in lb_log.messages() if m.startswith("access ") and "reason=own_path" in m]
    assert len(lines) == len(ADMIN_SPELLINGS + OWN_SPELLINGS), "each refusal has its access line"


async def test_a_wrong_method_on_any_own_route_is_the_balancers_405_read_from_its_router(fronted, http) -> None:
    system, backend = await fronted()
    methods: dict[str, set[str]] = {}
    for own in system.balancer.app.router.resources():
        if "proxied_path" not in own.canonical and "app" not in own.get_info():
            methods.setdefault(own.canonical, set()).update(route.method for route in own)
    assert methods.keys() >= {"/", "/health", "/status", "/errors/stats", "/metrics", "/events", "/openapi.json"}
    for path, allowed in methods.items():
        async with http.put(system.balancer_url + path) as response:
            assert response.status == 405, path
            assert set(response.headers["Allow"].split(",")) == allowed
    assert backend.hits == 0


async def test_client_limits_apply_live_to_new_connections(config_file, start_system) -> None:
    config_file.write(proxy={"header_timeout": 30.0})
    system = await start_system(config_file.load(), config_path=config_file.path)
    config_file.write(proxy={"header_timeout": 0.2})
    plan = await system.membership.reload()
    assert "[proxy] header_timeout: 30.0 -> 0.2" in plan.changes()
    answer = await exchange(system, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert answer.status == 408


async def test_pipelined_and_split_requests_pass_the_limits_untouched(fronted) -> None:
    system, backend = await fronted(proxy={"header_timeout": 5.0, "body_timeout": 5.0})
    reader, writer = await asyncio.open_connection(*address(system))
    try:
        # Three requests in one write, one with a body, then one split mid-head and mid-body.
        writer.write(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /d HTTP/1.1\r\nHo"
        )
        await writer.drain()
        await wait_for(lambda: backend.hits == 3, message="three pipelined requests forwarded")
        writer.write(b"st: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(0)
        writer.write(b"cd")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 4
    assert b'"body_bytes": 4' in data and b'"path": "/d"' in data


@pytest.mark.parametrize(
    ("target", "resolved"),
    [
        ("/tasks/1?x=/../admin", "/tasks/1"),
        ("/tasks/../tasks/1", "/tasks/1"),
        ("/a/./b/", "/a/b/"),
        ("/x/%2E%2e/admin/", "/admin/"),
        ("/x\\..\\admin", "/admin"),
        ("/x%5c..%5cadmin", "/admin"),
        ("///admin//reload", "/admin/reload"),
        ("/../../admin", "/admin"),
        ("/x/..", "/"),
        ("/%252e%252e/admin", "/%2e%2e/admin"),  # decoded once, as a backend does
    ],
)
def test_paths_resolve_as_a_lenient_backend_would(target: str, resolved: str) -> None:
    assert resolved_path(target) == resolved
