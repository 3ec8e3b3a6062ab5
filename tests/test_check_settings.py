"""Active check settings over real sockets: `expect_status`, `expect_body`, `host`, and a
backend's own `health_path`; a check that fails says why in `last_error`."""

from __future__ import annotations

from typing import Any

import pytest
from support.backends import FakeBackend
from support.config_files import FAST_HEALTH
from support.misbehaving import ScriptedServer, stall
from support.through import backend_statuses, served
from support.waiting import wait_for

from lb_system.balancing.checks import check_verdict
from lb_system.config import HealthConfig


@pytest.fixture
def balancer(make_config, start_system):
    """A system in front of outside backends; `extra` adds keys to each backend's entry by name."""

    async def start(servers: list[FakeBackend], extra: dict[str, dict[str, Any]] | None = None, **health: Any):
        entries = [{"name": s.name, "url": s.url, **(extra or {}).get(s.name, {})} for s in servers]
        return await start_system(make_config(backends=entries, health={**FAST_HEALTH, **health}))

    return start


def test_the_verdict_names_the_expected_status_and_the_one_received() -> None:
    settings = HealthConfig()
    assert check_verdict(settings, 200, b"") is None
    assert check_verdict(settings, 302, b"") is None  # 200-399 by default, as HAProxy's http-check
    assert check_verdict(settings, 404, b"") == "expected status 200-399, got 404"
    ranges = HealthConfig(expect_status="200,204,300-399")
    assert [check_verdict(ranges, code, b"") is None for code in (200, 201, 204, 300, 399, 400)] == [
        True, False, True, True, True, False,
    ]  # fmt: skip


def test_the_verdict_on_a_body_without_the_expected_text() -> None:
    settings = HealthConfig(expect_body="ready")
    assert check_verdict(settings, 200, b'{"state": "ready"}') is None
    assert check_verdict(settings, 200, b'{"state": "starting"}') == "expected body containing 'ready', got 200 without it"
    # The status is judged first: a 500 with the text is still a failed check.
    assert check_verdict(settings, 500, b"ready") == "expected status 200-399, got 500"


async def test_a_backend_answering_200_with_the_wrong_body_is_taken_down(fake_backends, balancer, http) -> None:
    alpha, beta = await fake_backends("alpha", "beta")
    system = await balancer([alpha, beta], expect_body='"server": "alpha"')
    backend = await backend_statuses(http, system.balancer_url)
    assert backend["alpha"]["healthy"] is True and backend["alpha"]["last_error"] is None
    assert backend["beta"]["healthy"] is False
    assert backend["beta"]["last_check_status"] == "200"
    assert backend["beta"]["last_error"] == 'expected body containing \'"server": "alpha"\', got 200 without it'
    assert backend["beta"]["transitions"][0]["reason"].startswith("health check failed: expected body containing")
    assert set(await served(http, system.balancer_url, 6)) == {"alpha"}


async def test_a_status_outside_expect_status_fails_the_check_and_says_so(fake_backends, balancer, http) -> None:
    good, moved, redirecting = await fake_backends("good", "moved", "redirecting")
    extra = {"moved": {"health_path": "/code/404"}, "redirecting": {"health_path": "/code/302"}}
    system = await balancer([good, moved, redirecting], extra)
    backend = await backend_statuses(http, system.balancer_url)
    assert backend["moved"]["healthy"] is False
    assert backend["moved"]["last_error"] == "expected status 200-399, got 404"
    assert backend["redirecting"]["healthy"] is True  # 3xx passes by default
    assert set(await served(http, system.balancer_url, 6)) == {"good", "redirecting"}


async def test_expect_status_narrows_what_passes(fake_backends, balancer, http) -> None:
    plain, accepting = await fake_backends("plain", "accepting")
    system = await balancer([plain, accepting], {"accepting": {"health_path": "/code/202"}}, expect_status="202,204")
    backend = await backend_statuses(http, system.balancer_url)
    assert backend["plain"]["last_error"] == "expected status 202,204, got 200"
    assert backend["accepting"]["healthy"] is True


async def test_a_backend_recovers_once_its_answer_is_as_expected_again(fake_backends, balancer, http) -> None:
    (server,) = await fake_backends("server")
    system = await balancer([server], expect_status="200")
    server.healthy = False  # /health answers 503
    await wait_for(lambda: not system.pool.get("server").healthy, message="the 503 taken as a failed check")
    assert system.pool.get("server").last_error == "expected status 200, got 503"
    server.healthy = True
    await wait_for(lambda: system.pool.get("server").healthy, message="back up")
    assert system.pool.get("server").last_error is None


async def test_a_check_sends_the_configured_host_header_to_the_backend_health_path(fake_backends, balancer, http) -> None:
    (server,) = await fake_backends("server")
    await balancer([server], {"server": {"health_path": "/probe?deep=1"}}, host="app.example:8443")
    await wait_for(lambda: any(h.get("Host") == "app.example:8443" for h in server.seen_headers), message="a check seen")
    assert server.hits >= 1  # the check went to the backend's own path, not /health


async def test_a_check_reads_64_kib_of_a_body_and_never_waits_for_the_rest(make_config, start_system, http) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
    # Both send a little over 64 KiB of a 1 MB body, then nothing: a check reading it whole would time out.
    early = await ScriptedServer.start(then=stall(head + b"ready" + b"y" * 70_000))
    late = await ScriptedServer.start(then=stall(head + b"y" * 65_536 + b"ready" + b"y" * 5_000))
    try:
        entries = [{"name": "early", "url": early.url}, {"name": "late", "url": late.url}]
        system = await start_system(make_config(backends=entries, health={**FAST_HEALTH, "expect_body": "ready"}))
        backend = await backend_statuses(http, system.balancer_url)
        assert backend["early"]["healthy"] is True and backend["early"]["last_error"] is None
        assert backend["late"]["last_error"] == "expected body containing 'ready', got 200 without it"
    finally:
        await early.close()
        await late.close()
