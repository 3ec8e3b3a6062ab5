"""Fault detection that cannot be fooled (issue #9 B): checks with connections of their own,
passive and active signals kept apart, ejection times, cut answers, and a checker that never dies.
Real misbehaving servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from support.waiting import wait_for

from lb_system.balancing.events import CheckResult, Observer, ProxiedRequest, Transition
from lb_system.observability.log import fields_of


@pytest.fixture
def balancer(make_config, start_system):
    async def start(servers: list, weights: dict[str, int] | None = None, **sections):
        entries = [{"name": s.name, "url": s.url, "weight": (weights or {}).get(s.name, 1)} for s in servers]
        return await start_system(make_config(backends=entries, **sections))

    return start


async def error_records(http: aiohttp.ClientSession, system) -> list[dict]:
    async with http.get(system.balancer_url + "/errors/stats") as r:
        return (await r.json())["recent_errors"]


# --- active checks never wait behind proxied requests -----------------------------------------


async def test_a_busy_backend_with_slow_answers_stays_up_and_serves_the_next_request(outside_backend, balancer, http) -> None:
    busy = await outside_backend("busy")
    system = await balancer(
        [busy],
        proxy={"max_connections_per_backend": 2},
        health={"interval": 60.0, "timeout": 0.5, "fall": 1},
    )
    slow = [asyncio.create_task(http.get(system.balancer_url + "/slow")) for _ in range(2)]
    await wait_for(lambda: busy.active == 2, message="both connections busy")
    await system.balancer.health_checker.check_once()  # its own connection: instant, whatever the pool holds
    backend = system.pool.get("busy")
    assert backend.healthy and backend.last_check_status == "200"
    following = asyncio.create_task(http.get(system.balancer_url + "/slow"))
    await wait_for(lambda: system.balancer.forwarder.in_flight == 3, message="the next request waiting for a connection")
    busy.release.set()  # answer now rather than after 1.5 s: the test needs no more waiting
    for task in [*slow, following]:
        async with await task as r:
            assert r.status == 200, "the next request waits for a connection and is served"
    assert backend.ejections == 0


# --- passive and active signals are independent ---------------------------------------------


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_a_hung_backend_with_good_checks_is_ejected_at_one_request_per_half_second(outside_backend, balancer, http) -> None:
    hung, good = await outside_backend("hung"), await outside_backend("good", misbehaves=False)
    system = await balancer(
        [hung, good],
        weights={"hung": 100},  # nearly every request tries the hung one first
        proxy={"per_try_timeout": 0.3},
        health={"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 3, "passive_fall": 3},
    )
    backend = system.pool.get("hung")
    checks_before = backend.checks_ok
    deadline = time.monotonic() + 8
    while backend.ejections == 0:
        assert time.monotonic() < deadline, f"not ejected: {backend.passive_failures} failures in a row"
        paced = asyncio.create_task(asyncio.sleep(0.5))  # the request rate of the scenario, not a wait for state
        async with http.get(system.balancer_url + "/hang") as r:
            assert r.status == 200 and r.headers["X-Backend"] == "good", "retried on the good backend"
        await paced
    assert backend.checks_ok - checks_before >= 3, "good checks ran between the timeouts"
    assert not backend.healthy
    assert "after 3 failed requests: timeout" in backend.transitions[-1].reason
    await system.balancer.health_checker.check_once()
    assert not backend.healthy, "a good check does not end an ejection"


# --- cut answers --------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/cut", "/short"])
async def test_a_backend_that_cuts_its_answers_is_ejected_and_recorded(outside_backend, balancer, http, lb_log, route) -> None:
    cutter, good = await outside_backend("cutter"), await outside_backend("good", misbehaves=False)
    system = await balancer([cutter, good], health={"interval": 60.0})
    cut_ids: list[str] = []
    for _ in range(40):
        async with http.get(system.balancer_url + route) as r:
            try:
                await r.read()
            except aiohttp.ClientPayloadError:
                assert r.headers["X-Backend"] == "cutter"
                cut_ids.append(r.headers["X-Request-ID"])
    backend = system.pool.get("cutter")
    assert backend.ejections == 1 and not backend.healthy
    assert len(cut_ids) == 3, "passive_fall cut answers, then no more traffic"
    recorded = [e for e in await error_records(http, system) if e["status"] == 502]
    assert {e["request_id"] for e in recorded} == set(cut_ids)
    assert {(e["server"], e["detail"]) for e in recorded} == {("cutter", "response body incomplete")}
    async with http.get(system.balancer_url + "/metrics") as r:
        exposition = await r.text()
    assert 'lb_requests_total{backend="cutter",code="502",method="GET"} 3.0' in exposition
    assert 'lb_errors_total{backend="cutter",code="502",type="502_BAD_GATEWAY"} 3.0' in exposition
    access = [m for m in lb_log.messages() if m.startswith("access") and cut_ids[0] in m]
    assert len(access) == 1 and "tries=cutter:cut" in access[0]


# --- the checker never dies ------------------------------------------------------------------


class Raising(Observer):
    """An observer that raises on every event it hears."""

    def __init__(self) -> None:
        self.calls = 0

    def on_check(self, result: CheckResult) -> None:
        self.calls += 1
        raise RuntimeError("observer bug (check)")

    def on_transition(self, backend: str, transition: Transition) -> None:
        self.calls += 1
        raise RuntimeError("observer bug (transition)")

    def on_request(self, done: ProxiedRequest) -> None:
        self.calls += 1
        raise RuntimeError("observer bug (request)")


async def test_a_raising_observer_stops_neither_checks_nor_requests(make_config, start_system, http, lb_log) -> None:
    system = await start_system(make_config())
    raising = Raising()
    system.pool.observers.add(raising)
    backend = system.pool.backends[0]
    checks = backend.checks_ok
    await wait_for(lambda: backend.checks_ok >= checks + 3, message="checks going on")
    async with http.get(system.balancer_url + "/tasks") as r:
        assert r.status == 200
    assert raising.calls >= 4
    failures = [r for r in lb_log.records if r.getMessage().startswith("observer failed")]
    assert {"check", "request"} <= {fields_of(r)["kind"] for r in failures}
    assert all(r.exc_info is not None for r in failures), "logged with the traceback"
    assert system.balancer.health_checker.restarts == 0


async def test_a_checker_task_that_ends_is_restarted_and_logged(make_config, start_system, lb_log) -> None:
    system = await start_system(make_config())
    checker = system.balancer.health_checker
    killed = checker.task
    assert killed is not None
    killed.cancel()
    await wait_for(lambda: checker.task is not killed and checker.task is not None, message="restarted")
    backend = system.pool.backends[0]
    checks = backend.checks_ok
    await wait_for(lambda: backend.checks_ok >= checks + 2, message="checks going on after the restart")
    assert checker.restarts == 1
    assert any("health checker ended unexpectedly" in m for m in lb_log.messages(logging.ERROR))


async def test_status_shows_the_age_of_each_backends_last_check(make_config, start_system, http) -> None:
    system = await start_system(make_config(health={"interval": 60.0}))
    async with http.get(system.balancer_url + "/status") as r:
        backends = (await r.json())["backends"]
    ages = [b["last_check_age_s"] for b in backends]
    assert all(isinstance(age, float | int) and 0 <= age < 60 for age in ages), ages


async def test_stopping_the_checker_just_as_it_is_woken_still_stops_it(make_config, start_system) -> None:
    # Python 3.11's asyncio.wait_for returned the wake-up and dropped this cancel: stop() then hung.
    system = await start_system(make_config(health={"interval": 3600}))
    checker = system.balancer.health_checker
    await asyncio.sleep(0)  # let the checker reach its wait
    checks = system.pool.backends[0].checks_ok
    checker.wake()
    await asyncio.wait_for(checker.stop(), 5)
    assert checker.task is None and system.pool.backends[0].checks_ok == checks
