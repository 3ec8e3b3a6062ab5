"""Unit tests for the numbers behind /status and the dashboard chart: latency percentiles,
last-minute error rate, per-second rates, downtime. Fake clocks, no network, no sleeping."""

from __future__ import annotations

import pytest
from support.clock import T0, FakeClock

from lb_system.balancing.events import ProxiedRequest, TryResult
from lb_system.balancing.pool import Backend, BackendPool
from lb_system.config import HealthConfig
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.request_stats import LATENCY_SAMPLES, RequestStats, percentile


def answered(backend: str, status: int, ms: float) -> ProxiedRequest:
    return ProxiedRequest("GET", status, backend, ms / 1000, (TryResult(backend, status, ms / 1000),))


# --- percentiles and latency --------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7


def test_latency_is_null_before_any_request(clock: FakeClock) -> None:
    assert RequestStats(clock=clock).latency_ms("backend-1") == {"p50": None, "p95": None, "p99": None}


def test_latency_percentiles_per_backend(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    for ms in range(1, 101):
        stats.on_request(answered("backend-1", 200, ms))
    stats.on_request(answered("backend-2", 200, 500))
    assert stats.latency_ms("backend-1") == {"p50": 50, "p95": 95, "p99": 99}
    assert stats.latency_ms("backend-2") == {"p50": 500, "p95": 500, "p99": 500}


def test_latency_covers_only_the_last_1000_requests(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    for _ in range(LATENCY_SAMPLES):
        stats.on_request(answered("backend-1", 200, 900))
    for _ in range(LATENCY_SAMPLES):
        stats.on_request(answered("backend-1", 200, 2))
    assert stats.latency_ms("backend-1")["p99"] == 2


def test_failed_tries_have_no_latency_but_count_as_errors(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    retried = ProxiedRequest(
        "GET", 200, "backend-2", 0.01, (TryResult("backend-1", None, 0.001), TryResult("backend-2", 200, 0.009))
    )
    stats.on_request(retried)
    assert stats.latency_ms("backend-1")["p50"] is None
    assert stats.error_rate("backend-1") == 1.0
    assert stats.error_rate("backend-2") == 0.0
    assert retried.retried_from == ("backend-1",)


# --- error rate over the last minute ------------------------------------------------


def test_error_rate_is_the_failed_share_of_the_last_minute(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    for status in (200, 200, 200, 404):
        stats.on_request(answered("backend-1", status, 1))
    assert stats.error_rate("backend-1") == 0.25
    assert stats.error_rate("never-seen") == 0.0


def test_error_rate_forgets_requests_older_than_a_minute(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    stats.on_request(answered("backend-1", 500, 1))
    clock.advance(30)
    stats.on_request(answered("backend-1", 200, 1))
    assert stats.error_rate("backend-1") == 0.5
    clock.advance(30)  # the 500 is now 60 s old: out of the window
    assert stats.error_rate("backend-1") == 0.0
    clock.advance(30)
    assert stats.error_rate("backend-1") == 0.0  # nothing left: 0, not a division by zero


def test_server_error_rate_counts_only_unanswered_tries_and_5xx(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    for status in (200, 404, 404, 400, 503):
        stats.on_request(answered("backend-1", status, 1))
    stats.on_request(ProxiedRequest("GET", 502, "backend-1", 0.01, (TryResult("backend-1", None, 0.01),)))
    assert stats.error_rate("backend-1") == round(5 / 6, 4)
    assert stats.server_error_rate("backend-1") == round(2 / 6, 4)
    assert stats.backend_fields("backend-1")["server_error_rate"] == round(2 / 6, 4)
    assert stats.server_error_rate("never-seen") == 0.0
    clock.advance(60)
    assert stats.server_error_rate("backend-1") == 0.0


# --- per-second rates ---------------------------------------------------------------


def test_requests_per_second_history_covers_five_minutes(clock: FakeClock) -> None:
    stats = RequestStats(clock=clock)
    stats.on_request(answered("backend-1", 200, 1))
    stats.on_request(answered("backend-1", 200, 1))
    series = stats.requests.series(clock())
    assert len(series) == 300 and series[-1] == 2 and sum(series) == 2
    clock.advance(299)
    assert stats.requests.series(clock())[0] == 2
    clock.advance(1)
    assert sum(stats.requests.series(clock())) == 0


def test_error_tracker_per_second_matches_what_was_recorded(clock: FakeClock) -> None:
    tracker = ErrorTracker(clock=clock)
    for status in (404, 500):
        tracker.record(status=status, method="GET", path="/x", server="backend-1", detail="d", request_id="r")
    clock.advance(1)
    tracker.record(status=404, method="GET", path="/x", server="backend-1", detail="d", request_id="r")
    assert tracker.per_second(3) == [0, 2, 1]
    clock.advance(300)
    assert tracker.per_second(300) == [0] * 300
    with pytest.raises(ValueError):
        tracker.per_second(901)


# --- downtime -----------------------------------------------------------------------


def test_downtime_adds_up_every_stretch_spent_down(clock: FakeClock) -> None:
    backend = Backend(name="b", url="http://127.0.0.1:1", hosted=False)
    pool = BackendPool([backend], health=HealthConfig(rise=1, fall=1), clock=clock)
    pool.record_check(backend, False, "connection refused", None)  # first check: down from now
    clock.advance(10)
    assert backend.downtime_s(clock()) == 10
    pool.record_check(backend, True, "200", 1.0)
    assert backend.state_since == clock()
    clock.advance(20)
    assert backend.downtime_s(clock()) == 10  # up: the total stays
    pool.record_check(backend, False, "timeout", None)
    clock.advance(5)
    assert backend.downtime_s(clock()) == 15
    assert [t.to for t in backend.transitions] == ["down", "up", "down"]
    assert backend.status_dict(clock())["downtime_s"] == 15


def test_a_backend_up_from_the_first_check_has_no_downtime(clock: FakeClock) -> None:
    backend = Backend(name="b", url="http://127.0.0.1:1", hosted=False)
    pool = BackendPool([backend], health=HealthConfig(), clock=clock)
    clock.advance(100)  # the time before the first check is not downtime
    pool.record_check(backend, True, "200", 1.0)
    clock.advance(100)
    assert backend.downtime_s(clock()) == 0
    assert backend.state_since == T0 + 100
