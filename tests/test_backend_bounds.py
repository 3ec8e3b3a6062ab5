"""A backend is as untrusted as a client (issue #16): an answer whose head breaks a bound costs
that backend one failed try, never the balancer. Real misbehaving servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from support.misbehaving import (
    Behaviour,
    ScriptedServer,
    answer,
    endless_chunk_extension,
    endless_chunk_line,
    endless_header_line,
    endless_header_lines,
    huge_field,
    interim_answers,
    many_fields,
    on_path,
)
from support.waiting import wait_for

from lb_system.upstream import FRAMING_TOO_LARGE, HEAD_TOO_LARGE, TOO_MANY_INTERIM

# The cast whose heads break a bound, and the 502's detail for each.
HEADS: list[tuple[Callable[[], Behaviour], str]] = [
    (huge_field, HEAD_TOO_LARGE),
    (many_fields, HEAD_TOO_LARGE),
    (endless_header_lines, HEAD_TOO_LARGE),
    (endless_header_line, HEAD_TOO_LARGE),
    (interim_answers, TOO_MANY_INTERIM),
]
HEAD_IDS = [cast.__name__ for cast, _ in HEADS]


@pytest.fixture
async def bad_backend() -> AsyncIterator[Callable[[Behaviour], Awaitable[ScriptedServer]]]:
    """Start a backend whose health check passes and that answers every other request as given."""
    servers: list[ScriptedServer] = []

    async def start(behaviour: Behaviour, *, keep_requests: bool = True) -> ScriptedServer:
        server = await ScriptedServer.start(
            then=on_path("/health", answer(body=b'{"status": "ok"}'), behaviour), keep_requests=keep_requests
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def proxied(server: ScriptedServer) -> int:
    """The requests a backend was sent, its health checks aside."""
    return sum(1 for r in server.requests if r.target != "/health")


def bad_beside_good(make_config, bad: ScriptedServer, good, **health: object):
    """A config where `bad` takes nearly every first try (weight 100) and `good` is there to retry on;
    checks every 60 s, so only proxied requests move the backends' state."""
    return make_config(
        backends=[{"name": "bad", "url": bad.url, "weight": 100}, {"name": "good", "url": good.url}],
        health={"interval": 60.0, **health},
    )


async def scrape(http: aiohttp.ClientSession, system, line_start: str) -> float:
    async with http.get(system.balancer_url + "/metrics") as r:
        exposition = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(line_start))


@pytest.mark.parametrize(("cast", "detail"), HEADS, ids=HEAD_IDS)
async def test_a_head_past_a_bound_is_the_balancers_502_and_the_backends_failure(
    bad_backend, make_config, start_system, http, lb_log, cast, detail
) -> None:
    bad = await bad_backend(cast())
    system = await start_system(make_config(backends=[{"name": "bad", "url": bad.url}], health={"interval": 60.0}))
    async with http.get(system.balancer_url + "/tasks/1") as r:
        assert r.status == 502
        assert r.headers["X-Backend"] == "balancer"
        assert r.content_type == "application/problem+json"
        assert not any(name.startswith(("X-Huge", "X-Field", "X-More", "X-Endless")) for name in r.headers)
        problem = await r.json(content_type=None)
        request_id = r.headers["X-Request-ID"]
    assert problem["detail"] == detail
    assert system.pool.get("bad").passive_failures == 1, "the backend's proxied failure"
    async with http.get(system.balancer_url + "/errors/stats") as r:
        recent = (await r.json())["recent_errors"]
    assert [(e["status"], e["detail"]) for e in recent if e["request_id"] == request_id] == [(502, detail)]
    access = [m for m in lb_log.messages() if m.startswith("access") and request_id in m]
    assert len(access) == 1 and f"bad:{detail}" in access[0]
    assert await scrape(http, system, 'lb_errors_total{backend="balancer",code="502"') == 1
    endpoint = system.balancer.forwarder.upstream.endpoint(bad.url)
    assert endpoint.open_connections == 0, "the connection was closed, not pooled"


@pytest.mark.parametrize(
    "cast",
    [lambda: many_fields(20), lambda: huge_field(3000)],
    ids=["past_max_response_headers", "past_max_response_header_bytes"],
)
async def test_the_bounds_are_the_configured_ones(bad_backend, make_config, start_system, http, cast) -> None:
    """[proxy] max_response_headers and max_response_header_bytes reach the transport: a head the
    defaults would take is refused past configured bounds of 10 fields and 2048 bytes."""
    bad = await bad_backend(cast())
    system = await start_system(
        make_config(
            backends=[{"name": "bad", "url": bad.url}],
            health={"interval": 60.0},
            proxy={"max_response_headers": 10, "max_response_header_bytes": 2048},
        )
    )
    async with http.get(system.balancer_url + "/tasks/1") as r:
        assert (r.status, r.headers["X-Backend"]) == (502, "balancer")
        assert (await r.json(content_type=None))["detail"] == HEAD_TOO_LARGE
    assert system.pool.get("bad").passive_failures == 1


@pytest.mark.parametrize(("cast", "detail"), HEADS, ids=HEAD_IDS)
async def test_such_a_backend_is_retried_around_and_ejected_after_passive_fall(
    bad_backend, outside_backend, make_config, start_system, http, cast, detail
) -> None:
    bad, good = await bad_backend(cast()), await outside_backend("good", misbehaves=False)
    system = await start_system(bad_beside_good(make_config, bad, good, passive_fall=3))
    backend = system.pool.get("bad")
    for _ in range(20):
        async with http.get(system.balancer_url + "/tasks/1") as r:
            assert r.status == 200 and r.headers["X-Backend"] == "good", "an idempotent request is retried"
        if backend.ejections:
            break
    assert backend.ejections == 1 and not backend.healthy
    assert proxied(bad) == 3, "passive_fall refused answers, then no more traffic"
    assert f"after 3 failed requests: {detail}" in backend.transitions[-1].reason
    async with http.get(system.balancer_url + "/tasks/1") as r:
        assert r.headers["X-Backend"] == "good"
    assert proxied(bad) == 3


async def test_a_post_whose_answer_is_refused_is_not_replayed_elsewhere(
    bad_backend, outside_backend, make_config, start_system, http
) -> None:
    bad, good = await bad_backend(many_fields()), await outside_backend("good", misbehaves=False)
    system = await start_system(bad_beside_good(make_config, bad, good))
    async with http.post(system.balancer_url + "/tasks", json={"title": "x"}) as r:
        assert (r.status, r.headers["X-Backend"]) == (502, "balancer"), "the backend may have acted on it"
        assert (await r.json(content_type=None))["detail"] == HEAD_TOO_LARGE
    assert proxied(bad) == 1 and good.hits == 0


@pytest.mark.parametrize("cast", [endless_chunk_line, endless_chunk_extension])
async def test_a_chunk_line_that_never_ends_cuts_the_answer_and_counts_against_the_backend(
    bad_backend, make_config, start_system, http, cast
) -> None:
    bad = await bad_backend(cast())
    system = await start_system(make_config(backends=[{"name": "bad", "url": bad.url}], health={"interval": 60.0}))
    async with http.get(system.balancer_url + "/tasks/1") as r:
        assert r.status == 200, "a chunked answer streams: its head went out before the framing broke"
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
        request_id = r.headers["X-Request-ID"]
    assert system.pool.get("bad").passive_failures == 1
    async with http.get(system.balancer_url + "/errors/stats") as r:
        recent = (await r.json())["recent_errors"]
    assert [(e["status"], e["server"], e["detail"]) for e in recent if e["request_id"] == request_id] == [
        (502, "bad", f"response body incomplete: {FRAMING_TOO_LARGE}")
    ]
    await wait_for(lambda: system.balancer.forwarder.upstream.endpoint(bad.url).open_connections == 0)


@pytest.mark.parametrize("cast", [endless_chunk_line, endless_chunk_extension])
async def test_a_backend_whose_chunk_lines_never_end_is_ejected_after_passive_fall(
    bad_backend, outside_backend, make_config, start_system, http, cast
) -> None:
    bad, good = await bad_backend(cast()), await outside_backend("good", misbehaves=False)
    system = await start_system(bad_beside_good(make_config, bad, good, passive_fall=3))
    backend = system.pool.get("bad")
    cuts = 0
    for _ in range(20):
        async with http.get(system.balancer_url + "/tasks/1") as r:
            try:
                await r.read()
            except aiohttp.ClientPayloadError:
                assert r.headers["X-Backend"] == "bad"
                cuts += 1
        if backend.ejections:
            break
    assert backend.ejections == 1 and cuts == 3
    assert f"after 3 failed requests: {FRAMING_TOO_LARGE}" in backend.transitions[-1].reason
    async with http.get(system.balancer_url + "/tasks/1") as r:
        assert r.status == 200 and r.headers["X-Backend"] == "good"


# --- memory stays flat whatever a backend sends -------------------------------------------------

# The scenario lasts 30 s; without the bounds memory grew some 240 MiB a second, so 10 s
# (LB_SOAK_SECONDS to change it) fails a regression by orders of magnitude.
SOAK_SECONDS = float(os.environ.get("LB_SOAK_SECONDS", "10"))
RSS_GROWTH_LIMIT = 32 << 20


async def four_clients(http: aiohttp.ClientSession, balancer_url: str, seconds: float) -> int:
    """Four clients asking the balancer at once, one request after another, for `seconds`: each
    gets a 502 (a refused head) or a cut answer (refused framing). How many answers came."""
    answered = 0

    async def client(until: float) -> None:
        nonlocal answered
        while time.monotonic() < until:
            async with http.get(balancer_url + "/tasks/1") as r:
                with pytest.raises(aiohttp.ClientPayloadError) if r.status == 200 else contextlib.nullcontext():
                    await r.read()
            answered += 1

    await asyncio.gather(*(client(time.monotonic() + seconds) for _ in range(4)))
    return answered


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage is POSIX")
@pytest.mark.parametrize("cast", [endless_header_lines, endless_header_line, endless_chunk_line])
async def test_memory_stays_flat_while_a_backend_streams_a_line_that_never_ends_to_four_clients(
    bad_backend, make_config, start_system, http, cast
) -> None:
    bad = await bad_backend(cast(), keep_requests=False)  # the test server keeps nothing per request
    system = await start_system(make_config(backends=[{"name": "bad", "url": bad.url}], health={"interval": 60.0}))
    await four_clients(http, system.balancer_url, 1.0)  # warm up: pools, buffers
    before = peak_rss()
    answered = await four_clients(http, system.balancer_url, SOAK_SECONDS)
    grown = peak_rss() - before
    print(f"{cast.__name__}: {answered} answers in {SOAK_SECONDS:.0f} s, peak RSS grew {grown / 2**20:.1f} MiB")
    assert answered > 4
    assert bad.sent > 0
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / 2**20:.1f} MiB"


def _status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB: VmRSS now, VmHWM the peak so far."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert found, field
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
@pytest.mark.parametrize("cast", [endless_header_lines, endless_chunk_line])
async def test_the_balancer_process_stays_flat_while_a_backend_streams_a_line_that_never_ends(
    bad_backend, http, tmp_path: Path, cast
) -> None:
    """The issue's scenario against `python run.py` itself: its RSS alone, not the test's."""
    bad = await bad_backend(cast(), keep_requests=False)
    config = tmp_path / "config.toml"
    config.write_text('[balancer]\nport = 0\n[health]\ninterval = 60.0\n[[backends]]\nname = "bad"\nurl = "%s"\n' % bad.url)
    output = tmp_path / "run.out"
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "run.py"),
            "--config",
            str(config),
            cwd=tmp_path,
            stdout=sink,
            stderr=sink,
        )
    try:
        url = ""

        def serving() -> bool:
            nonlocal url
            found = re.search(r"balancer on (http://\S+?);", output.read_text(errors="replace"))
            url = found.group(1) if found else ""
            return bool(url)

        await wait_for(serving, timeout=20, message="run.py serving")
        await four_clients(http, url, 1.0)  # warm up
        before = _status_kib(process.pid, "VmRSS")
        answered = await four_clients(http, url, SOAK_SECONDS)
        grown = (_status_kib(process.pid, "VmHWM") - before) * 1024
        print(f"run.py, {cast.__name__}: {answered} answers in {SOAK_SECONDS:.0f} s, peak RSS grew {grown / 2**20:.1f} MiB")
        assert answered > 4
        assert grown < RSS_GROWTH_LIMIT, f"run.py's RSS grew {grown / 2**20:.1f} MiB"
    finally:
        process.terminate()
        await process.wait()
