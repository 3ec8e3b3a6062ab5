"""Slow start: a backend back in service (or added) ramps from 10% to 100% of its weight over
`slow_start` seconds, whatever the strategy; driven by a fake clock, never by waiting."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from support.clock import FakeClock
from support.config_files import FAST_HEALTH
from support.through import backend_statuses, served
from support.waiting import wait_for

from lb_system.balancing.pool import DISABLED, ENABLED, Backend, BackendPool
from lb_system.balancing.strategies import STRATEGY_NAMES, make_strategy
from lb_system.config import HealthConfig

KEYS = [f"user-{i}" for i in range(4000)]


@dataclass
class View:
    name: str
    weight: int = 1
    active_requests: int = 0


def shares(strategy_name: str, fraction: float, picks: int = 4000) -> float:
    """The share of picks `b` gets while it weighs `fraction` of its weight beside a full `a`."""
    a, b = View("a"), View("b")
    strategy = make_strategy(strategy_name, rng=random.Random(11))
    strategy.set_backends([a, b])

    def weigh(view: View) -> float:
        return view.weight * (fraction if view is b else 1.0)

    chosen = Counter(getattr(strategy.choose([a, b], KEYS[i % len(KEYS)], weigh), "name", "-") for i in range(picks))
    return chosen["b"] / picks


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_gives_a_ramping_backend_a_share_that_grows_with_its_effective_weight(strategy: str) -> None:
    early, half, full = shares(strategy, 0.1), shares(strategy, 0.55), shares(strategy, 1.0)
    assert early < 0.14  # about 0.1 / 1.1 of the picks (of its keys' share on the ring)
    assert early < half < full
    assert 0.4 < full < 0.6


def test_consistent_hash_moves_keys_to_a_ramping_backend_and_keeps_them_there() -> None:
    a, b = View("a"), View("b")
    strategy = make_strategy("consistent_hash")
    strategy.set_backends([a, b])

    def owners(fraction: float) -> dict[str, str]:
        def weigh(view: View) -> float:
            return view.weight * (fraction if view is b else 1.0)

        return {key: strategy.choose([a, b], key, weigh).name for key in KEYS}  # type: ignore[union-attr]

    early, later, full = owners(0.2), owners(0.6), owners(1.0)
    assert {k for k, v in early.items() if v == "b"} <= {k for k, v in later.items() if v == "b"}
    assert {k for k, v in later.items() if v == "b"} <= {k for k, v in full.items() if v == "b"}


def test_least_connections_measures_load_against_the_effective_weight() -> None:
    a, b = View("a", active_requests=3), View("b", active_requests=1)
    strategy = make_strategy("least_connections")
    # b at 10% of its weight: 1 request is 10 per unit of weight, a's 3 are 3.
    assert strategy.choose([a, b], None, lambda v: 0.1 if v is b else 1.0) is a
    assert strategy.choose([a, b]) is b


def pool_with(clock: FakeClock, slow_start: float, names: Sequence[str] = ("a", "b")) -> BackendPool:
    backends = [Backend(n, f"http://{n}", hosted=False, weight=4) for n in names]
    pool = BackendPool(backends, health=HealthConfig(slow_start=slow_start, rise=1, fall=1), clock=clock)
    for backend in backends:
        pool.record_check(backend, True, "200", 1.0)
    return pool


def named(pool: BackendPool, name: str) -> Backend:
    backend = pool.get(name)
    assert backend is not None
    return backend


def test_a_backend_back_up_ramps_linearly_from_a_tenth_to_its_whole_weight(clock: FakeClock) -> None:
    pool = pool_with(clock, slow_start=100)
    b = named(pool, "b")
    assert b.effective_weight(clock()) == 4  # there from the start: no ramp
    pool.record_check(b, False, "503", 1.0)
    clock.advance(30)
    pool.record_check(b, True, "200", 1.0)
    assert b.status_dict(clock())["effective_weight"] == 0.4
    clock.advance(50)
    assert b.status_dict(clock())["effective_weight"] == 2.2  # 4 x (0.1 + 0.9 x 0.5)
    clock.advance(50)
    assert b.status_dict(clock())["effective_weight"] == 4.0
    assert pool.choose() is not None and b.ramp_start is None  # the finished ramp is dropped


def test_no_ramp_without_slow_start(clock: FakeClock) -> None:
    pool = pool_with(clock, slow_start=0)
    b = named(pool, "b")
    pool.record_check(b, False, "503", 1.0)
    pool.record_check(b, True, "200", 1.0)
    assert b.effective_weight(clock()) == 4


def test_enabled_again_and_added_backends_ramp_too(clock: FakeClock) -> None:
    pool = pool_with(clock, slow_start=10)
    a = named(pool, "a")
    pool.set_admin_state(a, DISABLED)
    pool.record_check(a, True, "200", 1.0)
    pool.set_admin_state(a, ENABLED)
    pool.record_check(a, True, "200", 1.0)  # the good check an enabled backend waits for
    assert a.effective_weight(clock()) == pytest.approx(0.4)

    added = Backend("c", "http://c", hosted=False, weight=4)
    pool.set_backends([*pool.backends, added])
    pool.record_check(added, True, "200", 1.0)
    assert added.effective_weight(clock()) == pytest.approx(0.4)


# --- over real sockets --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
async def test_slow_start_shows_in_the_share_of_requests_over_the_ramp(
    fake_backends, make_config, start_system, http, strategy: str
) -> None:
    clock = FakeClock()
    one, two = await fake_backends("one", "two", misbehaves=False)
    system = await start_system(
        make_config(
            backends=[{"name": "one", "url": one.url, "weight": 2}, {"name": "two", "url": two.url, "weight": 2}],
            health={**FAST_HEALTH, "slow_start": 60},
            balancer={"strategy": strategy, "hash_on": "header:X-Key"},
        ),
        clock=clock,
    )
    url = system.balancer_url
    assert {b["effective_weight"] for b in (await backend_statuses(http, url)).values()} == {2}

    await two.stop()
    await wait_for(lambda: not system.pool.get("two").healthy, message="two down")
    await two.start()
    await wait_for(lambda: system.pool.get("two").serving, message="two back")
    assert (await backend_statuses(http, url))["two"]["effective_weight"] == 0.2

    early = (await served(http, url, 220, keyed=True))["two"] / 220
    clock.advance(30)
    assert (await backend_statuses(http, url))["two"]["effective_weight"] == 1.1
    half = (await served(http, url, 220, keyed=True))["two"] / 220
    clock.advance(30)
    assert (await backend_statuses(http, url))["two"]["effective_weight"] == 2
    full = (await served(http, url, 220, keyed=True))["two"] / 220
    # About 0.09, 0.35 and 0.5 (consistent_hash: the ramp's fraction of the keys two owns).
    assert early < 0.2 and early < half < full and 0.35 < full < 0.65, (early, half, full)


def test_an_ejected_backend_ramps_when_its_checks_bring_it_back(clock: FakeClock) -> None:
    pool = pool_with(clock, slow_start=20, names=("a", "b", "c"))
    b = named(pool, "b")
    pool.set_health(pool.health.model_copy(update={"passive_fall": 1, "max_ejection_percent": 50, "ejection_time": 5.0}))
    pool.record_passive_failure(b, "connection reset")
    assert not b.healthy
    clock.advance(6)  # past its ejection
    pool.record_check(b, True, "200", 1.0)
    assert b.serving and b.effective_weight(clock()) == pytest.approx(0.4)
