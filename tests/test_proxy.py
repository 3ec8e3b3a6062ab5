"""The proxy engine through a real balancer: strategies, retries, timeouts, passive ejection,
streaming, headers, WebSockets and load shedding, against real misbehaving servers."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import trustme
from support.backends import GZIPPED, FakeBackend, MiB
from support.misbehaving import ScriptedServer, answer, half_closing_upgrade, on_path, stall, stream, upgrade_and_echo
from support.waiting import wait_for

from lb_system.observability.log import render_message


@pytest.fixture
def backends(fake_backends: Callable[..., Awaitable[list[FakeBackend]]]) -> Callable[..., Awaitable[list[FakeBackend]]]:
    return fake_backends


@pytest.fixture
def balancer(make_config, start_system):
    """Start a system in front of the given outside backends."""

    async def start(servers: list[FakeBackend], weights: dict[str, int] | None = None, **sections):
        entries = [{"name": s.name, "url": s.url, "weight": (weights or {}).get(s.name, 1)} for s in servers]
        sections.setdefault("health", {"interval": 60.0})
        return await start_system(make_config(backends=entries, **sections))

    return start


async def names(http: aiohttp.ClientSession, url: str, count: int, **kwargs) -> list[str]:
    result = []
    for _ in range(count):
        async with http.get(url, **kwargs) as r:
            assert r.status == 200
            result.append(r.headers["X-Backend"])
    return result


# --- strategies through the balancer --------------------------------------------------


async def test_weighted_round_robin_gives_3_to_1_interleaved(backends, balancer, http) -> None:
    servers = await backends("heavy", "light")
    system = await balancer(servers, weights={"heavy": 3})
    seen = await names(http, system.balancer_url + "/x", 16)
    assert collections.Counter(seen) == {"heavy": 12, "light": 4}
    assert "heavy" * 4 not in "".join(seen).replace("light", "-"), "never 4 in a row to one server"
    for start in range(0, 16, 4):
        assert seen[start : start + 4].count("light") == 1


async def test_least_connections_avoids_the_busy_backend(backends, balancer, http) -> None:
    busy, idle = await backends("busy", "idle")
    system = await balancer([busy, idle], balancer={"strategy": "least_connections"})
    held = asyncio.create_task(http.get(system.balancer_url + "/hold?s=10"))
    await wait_for(lambda: busy.active + idle.active == 1, message="one request held")
    holder = busy if busy.active else idle
    other = idle if holder is busy else busy
    assert await names(http, system.balancer_url + "/x", 5) == [other.name] * 5
    holder.release.set()
    (await held).release()


async def test_power_of_two_prefers_the_less_busy_of_two(backends, balancer, http) -> None:
    busy, idle = await backends("busy", "idle")
    idle.healthy = False
    system = await balancer([busy, idle], balancer={"strategy": "power_of_two"})
    held = [asyncio.create_task(http.get(system.balancer_url + "/hold?s=10")) for _ in range(2)]
    await wait_for(lambda: busy.active == 2, message="two requests held on the only backend up")
    idle.healthy = True
    await system.balancer.health_checker.check_once()
    assert set(await names(http, system.balancer_url + "/x", 5)) == {"idle"}
    busy.release.set()
    for task in held:
        (await task).release()


async def test_random_spreads_by_weight(backends, balancer, http) -> None:
    servers = await backends("a", "b")
    system = await balancer(servers, weights={"a": 4}, balancer={"strategy": "random"})
    counts = collections.Counter(await names(http, system.balancer_url + "/x", 200))
    assert set(counts) == {"a", "b"}
    assert 0.65 < counts["a"] / 200 < 0.95


async def test_consistent_hash_on_a_header_sticks_and_fails_over(backends, balancer, http) -> None:
    servers = await backends("a", "b", "c", "d")
    system = await balancer(servers, balancer={"strategy": "consistent_hash", "hash_on": "header:X-User"})
    homes = {}
    for user in range(20):
        seen = await names(http, system.balancer_url + "/x", 3, headers={"X-User": f"user-{user}"})
        assert len(set(seen)) == 1, "one key, one backend"
        homes[user] = seen[0]
    assert len(set(homes.values())) >= 3
    victim = next(s for s in servers if s.name == homes[0])
    await victim.stop()
    for user, home in homes.items():
        (now,) = set(await names(http, system.balancer_url + "/x", 2, headers={"X-User": f"user-{user}"}))
        if home != victim.name:
            assert now == home, "keys of healthy backends do not move"
        else:
            assert now != victim.name


# --- retries -----------------------------------------------------------------------------


async def test_a_503_is_retried_on_another_backend_for_get_only(backends, balancer, http) -> None:
    sick, good = await backends("sick", "good")
    system = await balancer([sick, good], health={"interval": 60.0, "passive_5xx": False})
    # /code/503 answers 503 on every backend, so the retry also gets 503: it shows in the tries.
    for _ in range(2):
        async with http.get(system.balancer_url + "/code/503") as r:
            assert r.status == 503
    assert sick.hits == 2 and good.hits == 2, "each GET tried both backends"
    sick.hits = good.hits = 0
    async with http.post(system.balancer_url + "/code/503") as r:
        assert r.status == 503
    assert sick.hits + good.hits == 1, "a POST answered 503 is not replayed"


async def test_retries_never_land_on_a_backend_already_tried(backends, balancer, http) -> None:
    servers = await backends("a", "b", "c")
    system = await balancer(servers, proxy={"retries": 5}, health={"interval": 60.0, "passive_5xx": False})
    async with http.get(system.balancer_url + "/code/502") as r:
        assert r.status == 502
    assert [s.hits for s in servers] == [1, 1, 1]


async def test_retries_setting_caps_the_tries(backends, balancer, http) -> None:
    servers = await backends("a", "b", "c")
    system = await balancer(servers, proxy={"retries": 1}, health={"interval": 60.0, "passive_5xx": False})
    async with http.get(system.balancer_url + "/code/504") as r:
        assert r.status == 504
    assert sum(s.hits for s in servers) == 2


async def test_every_try_is_in_the_access_log(backends, balancer, http, caplog) -> None:
    servers = await backends("a", "b")
    system = await balancer(servers, health={"interval": 60.0, "passive_5xx": False})
    with caplog.at_level("INFO", logger="lb_system"):
        async with http.get(system.balancer_url + "/code/503", headers={"X-Request-ID": "retry-log"}) as r:
            final = r.headers["X-Backend"]
    (line,) = [render_message(r) for r in caplog.records if "request_id=retry-log" in render_message(r)]
    first = "a" if final == "b" else "b"
    assert f"backend={final}" in line and f"tries={first}:503,{final}:503" in line


async def test_the_retry_budget_caps_concurrent_retries(backends, balancer, http) -> None:
    first, second = await backends("first", "second")
    system = await balancer(
        [first, second],
        weights={"first": 100},  # every first try goes to "first", every retry to "second"
        proxy={"retry_budget_percent": 0},
        health={"interval": 60.0, "passive_5xx": False},
    )
    requests = [asyncio.create_task(http.get(system.balancer_url + "/flaky?s=10")) for _ in range(4)]
    await wait_for(lambda: second.active == 3 and first.hits == 4, message="three retries held, the fourth refused")
    done, _ = await asyncio.wait(requests, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    (refused,) = done
    async with await refused as r:
        assert r.status == 503 and r.headers["X-Backend"] == "first"
    second.release.set()
    for task in requests:
        if task is not refused:
            async with await task as r:
                assert r.status == 200 and r.headers["X-Backend"] == "second"


async def test_nothing_is_retried_once_the_response_started(backends, balancer, http) -> None:
    servers = await backends("a", "b")
    system = await balancer(servers)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(system.balancer_url + "/truncated") as r:
            assert r.status == 200
            await r.read()
    assert sum(s.hits for s in servers) == 1


async def test_a_streamed_body_is_not_replayed(backends, balancer, http) -> None:
    servers = await backends("a", "b")
    system = await balancer(servers)
    async with http.put(system.balancer_url + "/drop", data=io.BytesIO(b"x" * (2 * MiB))) as r:
        assert r.status == 502
    assert sum(s.hits for s in servers) == 1
    before = [s.hits for s in servers]
    async with http.put(system.balancer_url + "/drop", data=b"x" * 1000) as r:
        assert r.status == 502
    # Each backend once: a small PUT is buffered, so the balancer retries it elsewhere, and the
    # transport never re-sends a request that was written whole (only a stale pooled GET/HEAD).
    assert [s.hits - hit for s, hit in zip(servers, before)] == [1, 1], "a small PUT is buffered, so it is retried once"


# --- timeouts ----------------------------------------------------------------------------


async def test_a_slow_backend_costs_only_its_own_requests(backends, balancer, http) -> None:
    slow, fast = await backends("slow", "fast")
    system = await balancer(
        [slow, fast], proxy={"per_try_timeout": 0.3, "retries": 0}, balancer={"strategy": "least_connections"}
    )
    # The held request goes to one backend; with retries off it gets a 504 from the per-try timeout.
    started = time.perf_counter()
    async with http.get(system.balancer_url + "/hold?s=10") as r:
        assert r.status == 504
        assert r.content_type == "application/problem+json"
    assert time.perf_counter() - started < 2.0

    holder = asyncio.create_task(http.get(system.balancer_url + "/hold?s=10"))
    await wait_for(lambda: slow.active + fast.active == 1, message="a request held")
    latencies = []
    for _ in range(20):
        begun = time.perf_counter()
        async with http.get(system.balancer_url + "/x") as r:
            assert r.status == 200
        latencies.append(time.perf_counter() - begun)
    assert max(latencies) < 0.25, "other requests keep their usual latency"
    async with await holder as r:
        assert r.status == 504


async def test_request_timeout_bounds_all_tries(backends, balancer, http) -> None:
    servers = await backends("a", "b", "c")
    system = await balancer(servers, proxy={"per_try_timeout": 0.4, "request_timeout": 0.6, "retries": 5})
    started = time.perf_counter()
    async with http.get(system.balancer_url + "/hold?s=10") as r:
        assert r.status == 504
    assert time.perf_counter() - started < 1.5
    assert sum(s.hits for s in servers) == 2, "the second try ran out of the request's time"


# --- passive health ----------------------------------------------------------------------


async def test_a_streamed_body_that_stalls_is_cut_after_per_try_timeout(backends, balancer, http, caplog) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"per_try_timeout": 0.3})
    started = time.perf_counter()
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(system.balancer_url + "/stall") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += len(chunk)
    assert received == MiB  # what came before the stall reached the client
    assert time.perf_counter() - started < 3
    assert any("upstream body failed" in r.getMessage() and "timeout" in render_message(r) for r in caplog.records)
    server.release.set()


async def test_consecutive_proxied_failures_eject_before_the_next_check(backends, balancer, http, lb_log) -> None:
    sick, good = await backends("sick", "good")
    system = await balancer([sick, good], health={"interval": 60.0, "passive_fall": 2, "fall": 10, "passive_5xx": True})
    for _ in range(4):
        async with http.get(system.balancer_url + "/code/500") as r:
            assert r.status == 500
    # Both answered 500; whichever reached passive_fall first is ejected, the cap keeps the other.
    (ejected,) = [b.name for b in system.pool.backends if not b.healthy]
    reason = "ejected for 10s after 2 failed requests: status 500"
    async with http.get(system.balancer_url + "/status") as r:
        status = {b["name"]: b for b in (await r.json())["backends"]}
    assert status[ejected]["ejections"] == 1
    assert reason in status[ejected]["transitions"][0]["reason"]
    assert any(ejected in line and reason in line for line in lb_log.messages(logging.WARNING))
    async with http.get(system.balancer_url + "/metrics") as r:
        exposition = await r.text()
    assert f'lb_backend_ejections_total{{backend="{ejected}"}} 1.0' in exposition


async def test_ejection_never_takes_the_last_eligible_backend(backends, balancer, http) -> None:
    a, b, c, d = await backends("a", "b", "c", "d")
    system = await balancer(
        [a, b, c, d], health={"interval": 60.0, "passive_fall": 1, "max_ejection_percent": 50, "passive_5xx": True}
    )
    for _ in range(12):
        async with http.get(system.balancer_url + "/code/500") as r:
            assert r.status == 500
    assert system.pool.healthy_count == 2, "50% of 4 backends at most"


async def test_an_ejected_backend_returns_through_active_checks_after_its_ejection_time(backends, balancer, http) -> None:
    sick, good = await backends("sick", "good")
    system = await balancer(
        [sick, good], health={"interval": 60.0, "passive_fall": 1, "rise": 1, "passive_5xx": True, "ejection_time": 0.3}
    )
    async with http.get(system.balancer_url + "/code/500") as r:
        ejected = system.pool.get(r.headers["X-Backend"])
    assert not ejected.healthy and ejected.ejected_until is not None
    await system.balancer.health_checker.check_once()
    assert not ejected.healthy, "a good check within the ejection time does not bring it back"
    until = ejected.ejected_until
    await wait_for(lambda: system.pool.clock() >= until, message="ejection time over")
    await system.balancer.health_checker.check_once()
    assert ejected.healthy


async def test_the_end_of_an_ejection_wakes_the_checker(backends, balancer, http) -> None:
    sick, good = await backends("sick", "good")
    system = await balancer(
        [sick, good], health={"interval": 60.0, "passive_fall": 1, "rise": 1, "passive_5xx": True, "ejection_time": 0.3}
    )
    async with http.get(system.balancer_url + "/code/500") as r:
        ejected = system.pool.get(r.headers["X-Backend"])
    assert not ejected.healthy and ejected.ejected_until is not None
    checks = ejected.checks_ok
    # Back within a second or so of its 0.3 s ejection, not at the next round 60 s away.
    await wait_for(lambda: ejected.healthy, timeout=5.0, message="checked as soon as the ejection ended")
    assert ejected.checks_ok == checks + 1 and ejected.ejected_until is None


# --- streaming and bodies ------------------------------------------------------------------


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read memory")
async def test_a_200_mib_download_and_100_mib_upload_stream_in_bounded_memory(backends, balancer, http) -> None:
    (server,) = await backends("big")
    system = await balancer([server])
    before = rss_bytes()
    received = 0
    async with http.get(system.balancer_url + f"/download?bytes={200 * MiB}") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(200 * MiB)
        async for chunk in r.content.iter_chunked(256 * 1024):
            received += len(chunk)
    assert received == 200 * MiB

    async def body():
        block = b"u" * (256 * 1024)
        for _ in range(400):
            yield block

    async with http.post(system.balancer_url + "/upload", data=body()) as r:
        assert r.status == 200
        assert (await r.json())["received"] == 100 * MiB
    growth = rss_bytes() - before
    assert growth < 50 * MiB, f"memory grew by {growth / MiB:.0f} MiB"


async def test_a_client_that_stops_reading_holds_up_the_backend_not_the_balancers_memory(make_config, start_system) -> None:
    server = await ScriptedServer.start(then=on_path("/health", answer(), stream(200 * MiB, block=256 * 1024)))
    writer = None
    try:
        system = await start_system(make_config(backends=[{"name": "s", "url": server.url}], health={"interval": 60.0}))
        host, port = system.balancer_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(MiB)  # then the client reads no more
        seen = {"sent": -1, "still": 0}

        def backend_held_up() -> bool:
            # The backend waits for its socket to drain and has sent nothing new for a while.
            still = server.draining and server.sent == seen["sent"]
            seen["sent"], seen["still"] = server.sent, seen["still"] + 1 if still else 0
            return seen["still"] >= 20

        await wait_for(backend_held_up, timeout=10, message="the backend held up by flow control")
        # What left the backend sits in socket buffers and at most a read's worth in the balancer.
        assert server.sent < 48 * MiB, f"{server.sent / MiB:.0f} MiB left the backend for a client that read 1 MiB"
    finally:
        if writer is not None:
            writer.transport.abort()
        await server.close()


async def test_an_https_backend_is_checked_and_served_through_the_same_transport(
    make_config, start_system, http, tmp_path
) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    server = await ScriptedServer.start(ssl_context=server_context)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    try:
        backends = [{"name": "tls", "url": server.url}]
        system = await start_system(make_config(backends=backends, health={"interval": 60.0}, proxy={"ca_file": "ca.pem"}))
        assert system.pool.get("tls").last_check_status == "200", "the check verified the certificate"
        async with http.get(system.balancer_url + "/x") as r:
            assert r.status == 200 and await r.read() == b"ok"
        unverified = await start_system(make_config(backends=backends, health={"interval": 60.0}))
        backend = unverified.pool.get("tls")
        assert not backend.healthy and backend.last_check_status == "cannot connect", "no CA, no trust"
    finally:
        await server.close()


async def test_chunked_stays_chunked_and_lengths_are_kept(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    async with http.get(system.balancer_url + f"/download?bytes={3 * MiB}&chunked=1") as r:
        assert r.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.headers
        assert len(await r.read()) == 3 * MiB
    async with http.get(system.balancer_url + "/download?bytes=1000") as r:
        assert r.headers["Content-Length"] == "1000" and len(await r.read()) == 1000


async def test_head_204_and_304_have_no_body(backends, balancer) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    host, port = system.balancer_url.removeprefix("http://").split(":")
    for request, status in (
        (b"HEAD /download?bytes=5000 HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n", b"204"),
        (b"GET /notmodified HTTP/1.1\r\nHost: x\r\n\r\n", b"304"),
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.split()[1] == status
        if status == b"200":
            assert b"Content-Length: 5000" in head
        # Nothing follows the head: the next bytes would be a body.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        writer.close()
        await writer.wait_closed()


async def test_compressed_bodies_pass_byte_for_byte(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    async with http.get(system.balancer_url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == GZIPPED
        assert r.headers["Content-Length"] == str(len(GZIPPED))


async def test_a_body_over_the_balancers_limit_is_413(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_body_bytes": 1000})
    async with http.post(system.balancer_url + "/upload", data=b"x" * 2000) as r:
        assert r.status == 413
        assert r.content_type == "application/problem+json"
    async with http.post(system.balancer_url + "/upload", data=b"x" * 500) as r:
        assert r.status == 200


async def test_a_streamed_upload_over_the_limit_is_413_not_a_backend_failure(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_body_bytes": 300_000})

    async def chunked_body():  # no Content-Length: the balancer only learns the size as it streams
        for _ in range(10):
            yield b"x" * 50_000

    async with http.post(system.balancer_url + "/upload", data=chunked_body()) as r:
        assert r.status == 413
        assert r.content_type == "application/problem+json"
    assert system.pool.get("s").consecutive_failures == 0


# --- headers -----------------------------------------------------------------------------


async def test_forwarding_headers_are_set_and_host_passes_through(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    async with http.get(
        system.balancer_url + "/x",
        headers={"Host": "shop.example", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil", "Via": "1.0 edge"},
    ) as r:
        seen = (await r.json())["headers"]
    assert seen["Host"] == "shop.example"
    assert seen["X-Forwarded-For"] == "127.0.0.1", "an untrusted client's X-Forwarded-For is replaced"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == "shop.example"
    assert seen["Via"] == "1.0 edge, 1.1 lb_system"


async def test_an_http_1_0_request_without_host_is_forwarded_without_a_name_lookup(backends, balancer, monkeypatch) -> None:
    (server,) = await backends("s")
    system = await balancer([server])

    def no_lookup() -> str:
        raise AssertionError("socket.getfqdn() called on the event loop")

    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    host, port = system.balancer_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /x HTTP/1.0\r\nX-Forwarded-Host: evil\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    seen = json.loads(body)["headers"]
    assert "X-Forwarded-Host" not in seen, "an untrusted client's X-Forwarded-Host is dropped, none is made up"
    assert seen["X-Forwarded-For"] == "127.0.0.1"


async def test_a_trusted_proxys_forwarded_for_is_appended(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"trusted_proxies": ["127.0.0.0/8"]})
    async with http.get(system.balancer_url + "/x", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}) as r:
        seen = (await r.json())["headers"]
    assert seen["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"


async def test_hop_by_hop_headers_are_dropped_both_ways(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    async with http.get(
        system.balancer_url + "/x",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "X-Kept": "yes",
        },
    ) as r:
        seen = (await r.json())["headers"]
    for name in ("X-Client-Hop", "TE", "Proxy-Authorization"):
        assert name not in seen
    assert seen["X-Kept"] == "yes"
    for path in ("/hop", "/hop?chunked=1"):  # a small answer, and a streamed one
        async with http.get(system.balancer_url + path, headers={"X-Request-ID": "hop-1"}) as r:
            assert "X-Secret-Hop" not in r.headers and "Keep-Alive" not in r.headers, path
            assert r.headers["X-End-To-End"] == "kept", path
            assert r.headers.getall("X-Backend") == ["s"], path
            assert r.headers.getall("X-Request-ID") == ["hop-1"], path
            assert await r.text() == "ok", path


# --- websockets --------------------------------------------------------------------------


async def test_websockets_are_proxied_both_ways(backends, balancer, http) -> None:
    (server,) = await backends("ws-backend")
    system = await balancer([server])
    async with http.ws_connect(system.balancer_url + "/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == "ws-backend:hello"
        await ws.send_bytes(b"abc")
        assert (await ws.receive_bytes(timeout=5)) == b"cba"
    await wait_for(lambda: system.pool.get("ws-backend").active_requests == 0, message="tunnel closed")


async def test_a_tunnel_stops_reading_the_client_while_the_backend_takes_nothing(make_config, start_system) -> None:
    switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    server = await ScriptedServer.start(then=on_path("/health", answer(), stall(switched)))  # never reads again
    writer = None
    try:
        system = await start_system(make_config(backends=[{"name": "s", "url": server.url}], health={"interval": 60.0}))
        host, port = system.balancer_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        sent = {"bytes": 0, "last": -1, "still": 0}

        async def flood(client: asyncio.StreamWriter) -> None:
            block = b"f" * MiB
            for _ in range(200):
                client.write(block)
                await client.drain()
                sent["bytes"] += MiB

        flooding = asyncio.create_task(flood(writer))

        def client_held_up() -> bool:
            still = sent["bytes"] == sent["last"]
            sent["last"], sent["still"] = sent["bytes"], sent["still"] + 1 if still else 0
            return sent["still"] >= 20

        await wait_for(client_held_up, timeout=10, message="the client's writes held up")
        assert sent["bytes"] < 48 * MiB, f"{sent['bytes'] / MiB:.0f} MiB taken from a client whose backend reads nothing"
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)
    finally:
        if writer is not None:
            writer.transport.abort()
        await server.close()


async def test_an_upgrade_the_backend_declines_gets_the_backends_answer(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with http.get(system.balancer_url + "/x", headers=handshake) as r:
        assert r.status == 200 and r.headers["X-Backend"] == "s", "not a WebSocket there: its answer, not a 502"
        await r.read()
    assert system.pool.get("s").consecutive_failures == 0
    endpoint = _forwarder(system).upstream.endpoint(server.url)
    await wait_for(lambda: endpoint.open_tunnels == 0, message="the handshake's connection closed")


async def test_http_requests_still_flow_while_max_connections_per_backend_tunnels_are_open(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_connections_per_backend": 2, "per_try_timeout": 1.0})
    tunnels = [await http.ws_connect(system.balancer_url + "/ws") for _ in range(3)]
    try:
        for ws in tunnels:  # every tunnel is open end to end
            await ws.send_str("up")
            assert (await ws.receive_str(timeout=5)) == "s:up"
        for _ in range(5):
            async with http.get(system.balancer_url + "/x") as r:
                assert r.status == 200, "a tunnel holds none of the backend's pooled connections"
    finally:
        for ws in tunnels:
            await ws.close()


async def test_past_max_tunnels_per_backend_a_websocket_gets_503_with_retry_after(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_tunnels_per_backend": 1})
    first = await http.ws_connect(system.balancer_url + "/ws")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(system.balancer_url + "/ws")
    assert caught.value.status == 503
    assert caught.value.headers is not None and caught.value.headers["Retry-After"] == "1"
    async with http.get(system.balancer_url + "/x") as r:
        assert r.status == 200, "HTTP requests are not capped by the tunnels"
    assert system.pool.get("s").healthy, "the cap is the balancer's, not the backend's fault"
    await first.close()
    endpoint = _forwarder(system).upstream.endpoint(server.url)
    await wait_for(lambda: endpoint.open_tunnels == 0, message="the tunnel's slot freed")
    async with http.ws_connect(system.balancer_url + "/ws") as again:
        await again.send_str("again")
        assert (await again.receive_str(timeout=5)) == "s:again"


# --- limits --------------------------------------------------------------------------------


async def test_past_the_connection_and_pending_caps_requests_are_shed_with_503(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_connections_per_backend": 2, "max_pending": 2})
    held = [asyncio.create_task(http.get(system.balancer_url + "/hold?s=10")) for _ in range(4)]
    await wait_for(lambda: system.balancer is not None and server.active == 2, message="two connections busy")
    await asyncio.sleep(0)  # the other two are queued for a connection
    await wait_for(lambda: _forwarder(system).in_flight == 4, message="four in flight")
    started = time.perf_counter()
    async with http.get(system.balancer_url + "/x") as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert "Too many requests" in (await r.json(content_type=None))["detail"]
    assert time.perf_counter() - started < 0.5, "shed at once, not queued"
    server.release.set()
    for task in held:
        async with await task as r:
            assert r.status == 200
    async with http.get(system.balancer_url + "/errors/stats") as r:
        assert (await r.json())["error_types"]["503_SERVICE_UNAVAILABLE"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read memory")
async def test_memory_stays_flat_under_overload(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_connections_per_backend": 4, "max_pending": 8})
    held = [asyncio.create_task(http.get(system.balancer_url + "/hold?s=30")) for _ in range(12)]
    await wait_for(lambda: _forwarder(system).in_flight == 12, message="caps full")

    async def burst() -> collections.Counter:
        async def one() -> int:
            async with http.get(system.balancer_url + "/x") as r:
                await r.read()
                return r.status

        return collections.Counter(await asyncio.gather(*(one() for _ in range(200))))

    await burst()  # warm-up: connection pools, caches
    before = rss_bytes()
    for _ in range(5):
        assert await burst() == {503: 200}
    growth = rss_bytes() - before
    assert growth < 8 * MiB, f"grew {growth / MiB:.1f} MiB while shedding 1000 requests"
    server.release.set()
    for task in held:
        (await task).release()


async def test_an_oversized_header_is_refused(backends, balancer, http) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"max_header_bytes": 1024})
    async with http.get(system.balancer_url + "/x", headers={"X-Big": "b" * 2000}) as r:
        assert r.status in (400, 431)
    async with http.get(system.balancer_url + "/x", headers={"X-Big": "b" * 500}) as r:
        assert r.status == 200


async def test_idle_client_connections_are_closed_after_idle_timeout(backends, balancer) -> None:
    (server,) = await backends("s")
    system = await balancer([server], proxy={"idle_timeout": 0.3})
    host, port = system.balancer_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    started = time.perf_counter()
    assert await asyncio.wait_for(reader.read(1), 5) == b"", "the server closed the idle connection"
    assert time.perf_counter() - started < 3
    writer.close()
    await writer.wait_closed()


def _forwarder(system):
    return system.balancer.forwarder


async def _upgraded(balancer_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client connection through the balancer, past its 101 (a socket of our own can half-close)."""
    host, port = balancer_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_tunnel_half_closed_by_either_side_goes_on_the_other_way(make_config, start_system, side: str) -> None:
    # As a TCP proxy: a FIN is passed on, and the other direction carries on until it ends too.
    received = bytearray()
    behaviour = upgrade_and_echo if side == "client" else half_closing_upgrade(received)
    backend = await ScriptedServer.start(then=on_path("/ws", behaviour, answer()))
    try:
        system = await start_system(make_config(backends=[{"name": "b", "url": backend.url}], health={"interval": 60.0}))
        reader, writer = await _upgraded(system.balancer_url)
        async with asyncio.timeout(5):
            if side == "client":
                writer.write(b"ping")
                writer.write_eof()  # the client sends no more, and waits for the echo
                assert await reader.read() == b"helloping"  # then the backend's FIN, passed on
            else:
                assert await reader.read() == b"bye"  # the backend's FIN, passed on
                writer.write(b"late")  # the other way still goes
                writer.write_eof()
                await wait_for(lambda: bytes(received) == b"late", message="the backend read after its half-close")
        writer.close()
        endpoint = system.balancer.forwarder.upstream.endpoint(backend.url)
        await wait_for(lambda: endpoint.open_tunnels == 0 and system.pool.get("b").active_requests == 0, message="tunnel ended")
    finally:
        await backend.close()


async def test_a_websocket_handshake_that_never_answers_times_out(make_config, start_system, http) -> None:
    """A backend that accepts the connection and then says nothing must not hold the tunnel open."""
    silent_connections: list[asyncio.StreamWriter] = []

    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)
        request = await reader.read(65536)
        if request.startswith(b"GET /health"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    silent = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        system = await start_system(
            make_config(
                backends=[{"name": "silent", "url": f"http://127.0.0.1:{port}"}],
                health={"interval": 60.0},
                proxy={"per_try_timeout": 0.3},
            )
        )
        started = time.perf_counter()
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(system.balancer_url + "/ws")
        assert caught.value.status == 502
        assert time.perf_counter() - started < 3
        assert system.pool.get("silent").active_requests == 0
    finally:
        for writer in silent_connections:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_a_timeout_while_queued_for_a_connection_does_not_eject_the_backend(backends, balancer, http) -> None:
    a, b = await backends("a", "b")
    system = await balancer(
        [a, b],
        balancer={"strategy": "consistent_hash", "hash_on": "header:X-Key"},  # both requests to one backend
        proxy={"max_connections_per_backend": 1, "per_try_timeout": 0.3, "retries": 0},
        health={"interval": 60.0, "passive_fall": 1},
    )
    # A streamed answer holds the only pooled connection while its body drips (no timeout: it moves).
    held = await http.get(system.balancer_url + "/trickle", headers={"X-Key": "k"})
    owner = system.pool.get("a" if a.active else "b")
    async with http.get(system.balancer_url + "/x", headers={"X-Key": "k"}) as r:
        assert r.status == 504
    assert owner.healthy, "waiting for our own pool says nothing about the backend"
    assert owner.consecutive_failures == 0
    (a if a.active else b).release.set()
    held.close()


async def test_a_client_leaving_mid_download_is_not_an_upstream_failure(backends, balancer, http, caplog) -> None:
    (server,) = await backends("s")
    system = await balancer([server])
    with caplog.at_level("WARNING", logger="lb_system"):
        host, port = system.balancer_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /download?bytes={50 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readexactly(1024 * 1024)
        writer.transport.abort()  # the client goes away with most of the body unread
        await wait_for(lambda: system.pool.get("s").active_requests == 0, message="stream finished")
    assert not [r for r in caplog.records if "upstream body failed" in r.getMessage()]
    assert system.pool.get("s").consecutive_failures == 0
