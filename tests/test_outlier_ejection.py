"""The pool's passive ejection on a fake clock: independent of active checks, timed, doubling,
capped, within max_ejection_percent; and the one guarded loop that tells the observers."""

from __future__ import annotations

import logging

import pytest
from support.clock import FakeClock

from lb_system.balancing.events import CheckResult, Observer, Observers, ProxiedRequest, Transition
from lb_system.balancing.pool import Backend, BackendPool
from lb_system.config import ConfigError, HealthConfig, parse_config
from lb_system.observability.log import fields_of


def make_pool(clock: FakeClock, count: int = 2, **health: object) -> BackendPool:
    settings: dict[str, object] = {"rise": 2, "fall": 3, "passive_fall": 3, "ejection_time": 10.0, "max_ejection_time": 300.0}
    settings.update(health)
    backends = [Backend(name=f"b{i}", url=f"http://127.0.0.1:{9000 + i}", hosted=False) for i in range(count)]
    pool = BackendPool(backends, health=HealthConfig.model_validate(settings), clock=clock)
    for backend in backends:
        pool.record_check(backend, True, "200", 1.0)
    return pool


def fail(pool: BackendPool, backend: Backend, times: int = 3) -> None:
    for _ in range(times):
        pool.record_passive_failure(backend, "timeout")


def good_checks(pool: BackendPool, backend: Backend, times: int) -> None:
    for _ in range(times):
        pool.record_check(backend, True, "200", 1.0)


def test_a_good_check_does_not_reset_the_count_of_proxied_failures(clock: FakeClock) -> None:
    pool = make_pool(clock)
    b0 = pool.backends[0]
    fail(pool, b0, 2)
    good_checks(pool, b0, 5)
    fail(pool, b0, 1)
    assert not b0.healthy and b0.ejections == 1


def test_only_a_successful_proxied_answer_resets_it(clock: FakeClock) -> None:
    pool = make_pool(clock)
    b0 = pool.backends[0]
    fail(pool, b0, 2)
    pool.record_passive_success(b0)
    fail(pool, b0, 2)
    assert b0.healthy and b0.passive_failures == 2


def test_proxied_failures_are_not_failed_checks(clock: FakeClock) -> None:
    pool = make_pool(clock, passive_fall=0, fall=1)
    b0 = pool.backends[0]
    fail(pool, b0, 10)
    assert b0.healthy, "passive_fall = 0 turns passive ejection off; failed forwards never count towards fall"
    assert b0.consecutive_failures == 0


def test_an_ejected_backend_stays_out_for_the_ejection_time_then_needs_rise_good_checks(clock: FakeClock) -> None:
    pool = make_pool(clock)
    b0 = pool.backends[0]
    fail(pool, b0)
    assert not b0.healthy and b0.ejected_until == clock.now + 10
    clock.advance(9.9)
    good_checks(pool, b0, 5)
    assert not b0.healthy, "good checks within the ejection time do not bring it back"
    clock.advance(0.1)
    good_checks(pool, b0, 1)
    assert not b0.healthy, "rise = 2 good checks after the ejection time"
    good_checks(pool, b0, 1)
    assert b0.healthy and b0.ejected_until is None


def test_the_ejection_time_doubles_with_each_consecutive_ejection_up_to_the_maximum(clock: FakeClock) -> None:
    pool = make_pool(clock, rise=1, max_ejection_time=50.0)
    b0 = pool.backends[0]
    durations = []
    for _ in range(5):
        fail(pool, b0)
        assert b0.ejected_until is not None
        durations.append(b0.ejected_until - clock.now)
        clock.now = b0.ejected_until
        good_checks(pool, b0, 1)
        assert b0.healthy
    assert durations == [10, 20, 40, 50, 50]
    assert b0.ejections == 5
    assert "ejected for 50s after 3 failed requests: timeout" in b0.transitions[-2].reason


def test_time_in_service_brings_the_ejection_time_back_down(clock: FakeClock) -> None:
    pool = make_pool(clock, rise=1)
    b0 = pool.backends[0]
    for _ in range(3):  # 10, 20, 40
        fail(pool, b0)
        assert b0.ejected_until is not None
        clock.now = b0.ejected_until
        good_checks(pool, b0, 1)
    clock.advance(25)  # two base ejection times in service: the streak of 3 drops to 1
    fail(pool, b0)
    assert b0.ejected_until == clock.now + 20


def test_an_ejected_backend_that_also_fails_its_checks_returns_only_with_good_checks(clock: FakeClock) -> None:
    pool = make_pool(clock, rise=1)
    b0 = pool.backends[0]
    fail(pool, b0)
    for _ in range(3):
        pool.record_check(b0, False, "connection refused", None)
    clock.advance(10)
    pool.record_check(b0, False, "connection refused", None)
    assert not b0.healthy
    good_checks(pool, b0, 1)
    assert b0.healthy


def test_max_ejection_percent_still_applies(clock: FakeClock) -> None:
    pool = make_pool(clock, count=4, max_ejection_percent=50)
    for backend in pool.backends:
        fail(pool, backend)
    assert pool.healthy_count == 2
    assert [b.ejections for b in pool.backends] == [1, 1, 0, 0]


def test_status_shows_the_last_checks_age_and_the_ejection(clock: FakeClock) -> None:
    never_checked = Backend(name="new", url="http://127.0.0.1:9", hosted=False)
    assert never_checked.status_dict(clock.now)["last_check_age_s"] is None
    pool = make_pool(clock)
    b0 = pool.backends[0]
    clock.advance(2.5)
    fail(pool, b0)
    status = b0.status_dict(clock.now)
    assert status["last_check_age_s"] == 2.5
    assert status["ejected_until"] is not None and status["ejections"] == 1


# --- one observer protocol, one guarded loop ------------------------------------------------


class Recording(Observer):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_check(self, result: CheckResult) -> None:
        self.events.append(f"check {result.backend} {result.ok}")

    def on_transition(self, backend: str, transition: Transition) -> None:
        self.events.append(f"{backend} {transition.to}")


class Broken(Observer):
    def on_transition(self, backend: str, transition: Transition) -> None:
        raise RuntimeError("observer bug")

    def on_request(self, done: ProxiedRequest) -> None:
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_is_logged_and_the_others_still_hear(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(clock)
    recording = Recording()
    pool.observers.add(Broken())
    pool.observers.add(recording)
    b0 = pool.backends[0]
    with caplog.at_level(logging.ERROR):
        fail(pool, b0)
    assert not b0.healthy, "the transition happened whatever the observer did"
    assert recording.events == ["b0 down"]
    (record,) = [r for r in caplog.records if "observer failed" in r.getMessage()]
    assert fields_of(record) == {"observer": "Broken", "kind": "transition"}
    assert record.exc_info is not None and "observer bug" in caplog.text


def test_observers_dispatch_every_kind_of_event() -> None:
    observers = Observers()
    recording = Recording()
    observers.add(recording)
    observers.on_check(CheckResult("b0", True, "200", 0.01))
    observers.on_request(ProxiedRequest("GET", 200, "b0", 0.01, ()))  # a no-op by default
    assert recording.events == ["check b0 True"]
    observers.remove(recording)
    observers.on_check(CheckResult("b0", True, "200", 0.01))
    assert len(observers) == 0 and recording.events == ["check b0 True"]


def test_health_config_defaults_and_ejection_time_validation() -> None:
    health = parse_config({}).health
    assert (health.passive_5xx, health.ejection_time, health.max_ejection_time) == (False, 10.0, 300.0)
    with pytest.raises(ConfigError, match=r"\[health\] max_ejection_time: must be at least ejection_time"):
        parse_config({"health": {"ejection_time": 20.0, "max_ejection_time": 5.0}})
    with pytest.raises(ConfigError, match=r"\[health\] ejection_time"):
        parse_config({"health": {"ejection_time": 0}})


def test_observers_skip_the_no_op_on_request_only() -> None:
    """Observers that keep Observer's no-op are left out of the per-request loop; any other way
    of having an on_request (a class's, an instance's own, a nested Observers) is still called."""
    heard: list[str] = []

    class Hears(Observer):
        def on_request(self, done: ProxiedRequest) -> None:
            heard.append(f"class {done.status}")

    class Plain(Observer):
        pass

    own = Plain()
    own.on_request = lambda done: heard.append(f"own {done.status}")  # type: ignore[method-assign]
    nested = Observers()
    nested.add(Hears())
    observers = Observers()
    for observer in (Recording(), Hears(), own, nested):
        observers.add(observer)
    observers.on_request(ProxiedRequest("GET", 200, "b0", 0.01, ()))
    assert heard == ["class 200", "own 200", "class 200"]
    observers.remove(own)
    observers.on_request(ProxiedRequest("GET", 201, "b0", 0.01, ()))
    assert heard[3:] == ["class 201", "class 201"] and len(observers) == 3
