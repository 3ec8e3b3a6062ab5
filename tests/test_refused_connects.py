"""A refused connect never reaches the client while another backend serves (issue #16 item 5):
a try that never reached its backend is retried on another whatever the retry budget says."""

from __future__ import annotations

import asyncio

import pytest
from support.clock import FakeClock

from lb_system.balancing.retry import RetryBudget
from lb_system.config import DEFAULT_POOL

BURST = 64


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_burst_after_idle_with_a_backend_just_killed_gets_no_502(
    outside_backend, make_config, start_system, http, lb_log, method
) -> None:
    backends = [await outside_backend(f"o{n}", misbehaves=False) for n in range(4)]
    system = await start_system(
        make_config(
            backends=[{"name": b.name, "url": b.url} for b in backends],
            health={"interval": 60.0},  # the checks have not noticed yet: only the forwarder's tries do
        )
    )
    clock = FakeClock()
    forwarder = system.balancer.forwarder
    # The default pool's budget, on a clock the test moves (the forwarder keeps one per pool).
    budget = forwarder.budgets[DEFAULT_POOL] = RetryBudget(system.config.proxy.retry_budget_percent, clock=clock)
    for _ in range(8):  # keep-alive connections to every backend
        async with http.get(system.balancer_url + "/warm") as r:
            assert r.status == 200
    clock.advance(11.0)  # idle past the budget's 10 s window: it remembers no request
    await backends[3].stop()

    async def one() -> tuple[int, str]:
        async with http.request(method, system.balancer_url + "/burst", data=b"x") as r:
            await r.read()
            return r.status, r.headers["X-Backend"]

    answers = await asyncio.gather(*(one() for _ in range(BURST)))
    assert [a for a in answers if a[0] != 200] == [], "every request is served by a live backend"
    assert {backend for _, backend in answers} <= {"o0", "o1", "o2"}
    refused = [m for m in lb_log.messages() if m.startswith("access") and "o3:connection refused" in m]
    assert len(refused) >= 2, "the burst did try the dead backend"
    assert budget.active == 0
