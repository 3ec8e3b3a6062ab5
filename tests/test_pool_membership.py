"""The pool owns its backends: tries in flight, drains, moves and retirement, without a network."""

from __future__ import annotations

import asyncio
import logging

from support.clock import FakeClock

from lb_system.balancing.pool import DRAINING, ENABLED, Backend, BackendPool
from lb_system.config import HealthConfig


def make_pool(clock: FakeClock, *names: str) -> BackendPool:
    backends = [Backend(name=name, url=f"http://127.0.0.1:{5000 + i}", hosted=False) for i, name in enumerate(names)]
    return BackendPool(backends, health=HealthConfig(), logger=logging.getLogger("lb_system.test"), clock=clock)


def test_acquire_and_release_count_a_try_in_flight(clock: FakeClock) -> None:
    pool = make_pool(clock, "a")
    backend = pool.backends[0]
    pool.acquire(backend)
    pool.acquire(backend)
    assert (backend.requests, backend.active_requests) == (2, 2)
    pool.release(backend)
    assert (backend.requests, backend.active_requests) == (2, 1)


async def test_the_last_release_completes_a_drain_and_wakes_its_waiter(clock: FakeClock) -> None:
    pool = make_pool(clock, "a", "b")
    backend = pool.backends[0]
    pool.acquire(backend)
    pool.acquire(backend)
    assert pool.set_admin_state(backend, DRAINING) is True
    waiter = asyncio.create_task(pool.wait_drained(backend))
    pool.release(backend)
    await asyncio.sleep(0)
    assert not waiter.done() and backend.drained_at is None
    clock.advance(3)
    pool.release(backend)
    assert await asyncio.wait_for(waiter, 5) is True
    assert backend.drained_at == clock.now


def test_draining_an_idle_backend_is_drained_at_once(clock: FakeClock) -> None:
    pool = make_pool(clock, "a")
    backend = pool.backends[0]
    pool.set_admin_state(backend, DRAINING)
    assert backend.drained_at == clock.now


def test_enabling_a_draining_backend_ends_the_drain(clock: FakeClock) -> None:
    pool = make_pool(clock, "a")
    backend = pool.backends[0]
    pool.acquire(backend)
    pool.set_admin_state(backend, DRAINING)
    pool.set_admin_state(backend, ENABLED)
    pool.release(backend)
    assert backend.drained_at is None and backend.awaiting_check is True


async def test_a_drain_that_times_out_is_not_marked_drained_later(clock: FakeClock) -> None:
    pool = make_pool(clock, "a", "b")
    backend = pool.backends[0]
    pool.acquire(backend)
    pool.set_backends(pool.backends[1:])
    pool.retire(backend)
    assert pool.retiring == [backend] and backend.admin_state == DRAINING
    assert await pool.wait_drained(backend, timeout=0.01) is False
    pool.release(backend)
    assert backend.drained_at is None
    pool.forget(backend)
    assert pool.retiring == []


def test_a_move_waits_for_a_good_check_at_the_new_address(clock: FakeClock) -> None:
    pool = make_pool(clock, "a")
    backend = pool.backends[0]
    pool.record_check(backend, True, "200", 1.0)
    assert backend.eligible
    pool.move(backend, "http://127.0.0.1:6000", hosted=True)
    assert (backend.url, backend.hosted, backend.listening) == ("http://127.0.0.1:6000", True, True)
    assert not backend.eligible
    pool.record_check(backend, True, "200", 1.0)
    assert backend.eligible
