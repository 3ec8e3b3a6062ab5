"""Unit tests for lb_system.error_tracker, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from support.clock import T0, FakeClock

import lb_system.observability.error_tracker as et
from lb_system.observability.error_tracker import ErrorTracker, error_type


@pytest.fixture
def tracker(clock: FakeClock) -> ErrorTracker:
    return ErrorTracker(clock=clock)


def rec(
    tracker: ErrorTracker,
    status: int = 404,
    *,
    method: str = "GET",
    path: str = "/tasks/1",
    server: str = "backend-1",
    detail: str = "boom",
    request_id: str = "rid",
    route: str | None = None,
) -> None:
    tracker.record(
        status=status,
        method=method,
        path=path,
        server=server,
        detail=detail,
        request_id=request_id,
        route=route,
    )


def request_ids(stats: dict[str, Any]) -> list[str]:
    return [e["request_id"] for e in stats["recent_errors"]]


# error_type


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, "400_BAD_REQUEST"),
        (404, "404_NOT_FOUND"),
        (405, "405_METHOD_NOT_ALLOWED"),
        (429, "429_TOO_MANY_REQUESTS"),
        (502, "502_BAD_GATEWAY"),
        (503, "503_SERVICE_UNAVAILABLE"),
        (504, "504_GATEWAY_TIMEOUT"),
    ],
)
def test_error_type_is_code_and_http_status_name(status: int, expected: str) -> None:
    assert error_type(status) == expected


def test_error_type_names_500_internal_error_not_internal_server_error() -> None:
    assert error_type(500) == "500_INTERNAL_ERROR"


@pytest.mark.parametrize("status", [599, 499, 999])
def test_error_type_marks_unknown_codes_as_unknown(status: int) -> None:
    assert error_type(status) == f"{status}_UNKNOWN"


# shape and counting


def test_stats_has_the_contract_keys_in_order(tracker: ErrorTracker) -> None:
    assert list(tracker.stats()) == [
        "total_errors",
        "error_types",
        "by_server",
        "recent_errors",
        "since",
        "by_method",
        "windows",
        "top_paths",
    ]


def test_fresh_tracker_reports_the_three_always_present_types_as_zero(tracker: ErrorTracker) -> None:
    stats = tracker.stats()
    assert stats["total_errors"] == 0
    assert stats["error_types"] == {"400_BAD_REQUEST": 0, "404_NOT_FOUND": 0, "500_INTERNAL_ERROR": 0}
    assert stats["by_server"] == {}
    assert stats["by_method"] == {}
    assert stats["recent_errors"] == []
    assert stats["top_paths"] == []
    assert stats["windows"] == {w: {"total": 0, "by_type": {}} for w in ("1m", "5m", "15m")}


def test_always_present_types_stay_when_other_types_are_recorded(tracker: ErrorTracker) -> None:
    rec(tracker, 503)
    types = tracker.stats()["error_types"]
    assert types == {
        "400_BAD_REQUEST": 0,
        "404_NOT_FOUND": 0,
        "500_INTERNAL_ERROR": 0,
        "503_SERVICE_UNAVAILABLE": 1,
    }


def test_counts_errors_by_type_server_and_method(tracker: ErrorTracker) -> None:
    rec(tracker, 400, method="POST", server="backend-1")
    rec(tracker, 404, method="GET", server="backend-1")
    rec(tracker, 500, method="GET", server="backend-2")
    rec(tracker, 404, method="DELETE", server="backend-2")
    stats = tracker.stats()
    assert stats["total_errors"] == 4
    assert tracker.total == 4
    assert stats["error_types"] == {"400_BAD_REQUEST": 1, "404_NOT_FOUND": 2, "500_INTERNAL_ERROR": 1}
    assert stats["by_server"] == {"backend-1": 2, "backend-2": 2}
    assert stats["by_method"] == {"DELETE": 1, "GET": 2, "POST": 1}


def test_counts_keep_growing_past_the_recent_limit(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=3, clock=clock)
    for _ in range(10):
        rec(tracker)
    stats = tracker.stats()
    assert stats["total_errors"] == 10
    assert stats["error_types"]["404_NOT_FOUND"] == 10
    assert len(stats["recent_errors"]) == 3


def test_methods_beyond_the_cap_count_as_other(tracker: ErrorTracker) -> None:
    for i in range(et.MAX_METHODS):
        rec(tracker, method=f"M{i:02d}")
    rec(tracker, method="BREW")
    rec(tracker, method="M00")
    by_method = tracker.stats()["by_method"]
    assert by_method[et.OTHER_METHOD] == 1
    assert by_method["M00"] == 2
    assert "BREW" not in by_method
    assert len(by_method) == et.MAX_METHODS + 1


# recent_errors


def test_recent_errors_are_newest_first_with_every_field(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 400, method="POST", path="/tasks", server="backend-2", detail="bad json", request_id="a")
    clock.advance(1.25)
    rec(tracker, 404, path="/tasks/999999", detail="Task 999999 not found", request_id="b")
    recent = tracker.stats()["recent_errors"]
    assert recent == [
        {
            "timestamp": "2023-11-14T22:13:21.250Z",
            "status": 404,
            "type": "404_NOT_FOUND",
            "method": "GET",
            "path": "/tasks/999999",
            "server": "backend-1",
            "detail": "Task 999999 not found",
            "request_id": "b",
        },
        {
            "timestamp": "2023-11-14T22:13:20.000Z",
            "status": 400,
            "type": "400_BAD_REQUEST",
            "method": "POST",
            "path": "/tasks",
            "server": "backend-2",
            "detail": "bad json",
            "request_id": "a",
        },
    ]


def test_recent_errors_keep_the_raw_path_even_when_a_route_is_given(tracker: ErrorTracker) -> None:
    rec(tracker, path="/tasks/7", route="/tasks/{id}")
    assert tracker.stats()["recent_errors"][0]["path"] == "/tasks/7"


def test_recent_errors_are_bounded_to_the_newest(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=5, clock=clock)
    for i in range(12):
        rec(tracker, request_id=str(i))
    assert request_ids(tracker.stats()) == ["11", "10", "9", "8", "7"]


def test_default_recent_is_50(tracker: ErrorTracker) -> None:
    for i in range(60):
        rec(tracker, request_id=str(i))
    assert tracker.recent == 50
    assert len(tracker.stats()["recent_errors"]) == 50


def test_timestamps_are_utc_iso_with_milliseconds_and_z(clock: FakeClock) -> None:
    clock.now = 1_796_355_601.5  # 2026-12-04T03:40:01.5Z
    tracker = ErrorTracker(clock=clock)
    clock.advance(0.007)
    rec(tracker)
    stats = tracker.stats()
    assert stats["since"] == "2026-12-04T03:40:01.500Z"
    assert stats["recent_errors"][0]["timestamp"] == "2026-12-04T03:40:01.507Z"


def test_long_details_are_clipped(tracker: ErrorTracker) -> None:
    rec(tracker, detail="x" * (et.MAX_DETAIL_CHARS * 5))
    assert tracker.stats()["recent_errors"][0]["detail"] == "x" * et.MAX_DETAIL_CHARS


# resizing


def test_shrinking_recent_keeps_the_newest_records(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=10, clock=clock)
    for i in range(10):
        rec(tracker, request_id=str(i))
    tracker.recent = 3
    assert tracker.recent == 3
    assert request_ids(tracker.stats()) == ["9", "8", "7"]
    rec(tracker, request_id="10")
    assert request_ids(tracker.stats()) == ["10", "9", "8"]


def test_growing_recent_keeps_existing_records_and_makes_room(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=2, clock=clock)
    for i in range(4):
        rec(tracker, request_id=str(i))
    tracker.recent = 4
    rec(tracker, request_id="4")
    rec(tracker, request_id="5")
    assert request_ids(tracker.stats()) == ["5", "4", "3", "2"]


def test_resizing_recent_does_not_touch_counters(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=10, clock=clock)
    for _ in range(7):
        rec(tracker)
    tracker.recent = 1
    assert tracker.total == 7
    assert tracker.stats()["total_errors"] == 7


def test_recent_rejects_negative_and_non_int_sizes(tracker: ErrorTracker, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        tracker.recent = -1
    with pytest.raises(TypeError):
        tracker.recent = 2.5  # type: ignore[assignment]
    with pytest.raises(ValueError):
        ErrorTracker(recent=-3, clock=clock)
    assert tracker.recent == 50


# filters and limit


@pytest.fixture
def mixed(clock: FakeClock) -> ErrorTracker:
    tracker = ErrorTracker(recent=10, clock=clock)
    rows = [("b1", 404), ("b2", 500), ("b1", 500), ("b2", 404), ("b1", 404), ("b2", 503)]
    for i, (server, status) in enumerate(rows):
        rec(tracker, status, server=server, request_id=str(i))
    return tracker


def test_filter_by_server_lists_only_that_servers_errors(mixed: ErrorTracker) -> None:
    stats = mixed.stats(server="b1")
    assert request_ids(stats) == ["4", "2", "0"]
    assert {e["server"] for e in stats["recent_errors"]} == {"b1"}


def test_filter_by_status_lists_only_that_status(mixed: ErrorTracker) -> None:
    assert request_ids(mixed.stats(status=404)) == ["4", "3", "0"]


def test_filters_combine(mixed: ErrorTracker) -> None:
    assert request_ids(mixed.stats(server="b2", status=500)) == ["1"]
    assert mixed.stats(server="b3")["recent_errors"] == []


def test_limit_caps_the_newest_matching_errors(mixed: ErrorTracker) -> None:
    assert request_ids(mixed.stats(limit=2)) == ["5", "4"]
    assert request_ids(mixed.stats(server="b1", limit=2)) == ["4", "2"]
    assert mixed.stats(limit=0)["recent_errors"] == []


def test_limit_larger_than_recent_returns_at_most_recent(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=3, clock=clock)
    for i in range(8):
        rec(tracker, request_id=str(i))
    assert request_ids(tracker.stats(limit=1000)) == ["7", "6", "5"]


def test_negative_limit_is_rejected(mixed: ErrorTracker) -> None:
    with pytest.raises(ValueError):
        mixed.stats(limit=-1)


def test_filters_do_not_change_the_counters(mixed: ErrorTracker) -> None:
    unfiltered = mixed.stats()
    filtered = mixed.stats(server="b1", status=404, limit=1)
    for key in ("total_errors", "error_types", "by_server", "by_method", "windows", "top_paths"):
        assert filtered[key] == unfiltered[key], key
    assert filtered["total_errors"] == 6


# rolling windows


def windows(tracker: ErrorTracker) -> dict[str, int]:
    return {name: w["total"] for name, w in tracker.stats()["windows"].items()}


def test_windows_count_recent_errors_by_type(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 404)
    clock.advance(10)
    rec(tracker, 404)
    rec(tracker, 500)
    w = tracker.stats()["windows"]
    for name in ("1m", "5m", "15m"):
        assert w[name] == {"total": 3, "by_type": {"404_NOT_FOUND": 2, "500_INTERNAL_ERROR": 1}}


def test_windows_forget_errors_older_than_the_window(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 500)
    clock.advance(61)
    assert windows(tracker) == {"1m": 0, "5m": 1, "15m": 1}
    clock.advance(240)  # 301 s after the error
    assert windows(tracker) == {"1m": 0, "5m": 0, "15m": 1}
    clock.advance(600)  # 901 s after the error
    assert windows(tracker) == {"1m": 0, "5m": 0, "15m": 0}
    assert tracker.stats()["windows"]["15m"]["by_type"] == {}
    assert tracker.total == 1


def test_windows_roll_errors_off_one_by_one(tracker: ErrorTracker, clock: FakeClock) -> None:
    for _ in range(5):
        rec(tracker)
        clock.advance(30)
    # Errors at ages 150, 120, 90, 60, 30 s.
    assert windows(tracker) == {"1m": 1, "5m": 5, "15m": 5}
    clock.advance(160)  # ages 310, 280, 250, 220, 190 s
    assert windows(tracker) == {"1m": 0, "5m": 4, "15m": 5}


def test_windows_are_exact_to_one_second(tracker: ErrorTracker, clock: FakeClock) -> None:
    clock.now = T0 + 0.9
    rec(tracker)
    clock.now = T0 + 59.99
    assert windows(tracker)["1m"] == 1
    clock.now = T0 + 60.0
    assert windows(tracker)["1m"] == 0


def test_windows_forget_everything_after_a_jump_of_more_than_15_minutes(tracker: ErrorTracker, clock: FakeClock) -> None:
    for _ in range(100):
        rec(tracker, 404)
        clock.advance(7)  # spread over ~700 s, many buckets
    clock.advance(3600)
    assert windows(tracker) == {"1m": 0, "5m": 0, "15m": 0}
    rec(tracker, 503)
    w = tracker.stats()["windows"]
    for name in ("1m", "5m", "15m"):
        assert w[name] == {"total": 1, "by_type": {"503_SERVICE_UNAVAILABLE": 1}}


def test_windows_do_not_reuse_a_bucket_from_exactly_15_minutes_ago(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 404)
    clock.advance(900)  # lands in the same ring slot
    rec(tracker, 400)
    w = tracker.stats()["windows"]
    assert w["15m"] == {"total": 1, "by_type": {"400_BAD_REQUEST": 1}}


def test_windows_still_count_errors_when_the_clock_steps_back(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 404)
    clock.advance(-30)
    rec(tracker, 500)
    w = tracker.stats()["windows"]
    assert w["1m"] == {"total": 2, "by_type": {"404_NOT_FOUND": 1, "500_INTERNAL_ERROR": 1}}


def test_windows_drop_errors_after_the_clock_steps_back_more_than_15_minutes(tracker: ErrorTracker, clock: FakeClock) -> None:
    rec(tracker, 404)
    clock.advance(-3600)
    assert windows(tracker) == {"1m": 0, "5m": 0, "15m": 0}


def test_windows_handle_a_steady_stream(tracker: ErrorTracker, clock: FakeClock) -> None:
    for _ in range(2000):  # one error per second for 2000 s
        clock.advance(1)
        rec(tracker)
    assert windows(tracker) == {"1m": 60, "5m": 300, "15m": 900}


# top_paths


def test_top_paths_group_by_route_pattern(tracker: ErrorTracker) -> None:
    for i in range(3):
        rec(tracker, path=f"/tasks/{i}", route="/tasks/{id}")
    rec(tracker, path="/nope")
    assert tracker.stats()["top_paths"] == [
        {"path": "/tasks/{id}", "count": 3},
        {"path": "/nope", "count": 1},
    ]


def test_top_paths_are_highest_first_ties_by_path_and_at_most_ten(tracker: ErrorTracker) -> None:
    counts = {f"/p{i:02d}": i for i in range(1, 13)}  # /p01 once ... /p12 twelve times
    counts["/a"] = 5
    counts["/z"] = 5
    for path, n in counts.items():
        for _ in range(n):
            rec(tracker, path=path)
    top = tracker.stats()["top_paths"]
    assert [(t["path"], t["count"]) for t in top] == [
        ("/p12", 12),
        ("/p11", 11),
        ("/p10", 10),
        ("/p09", 9),
        ("/p08", 8),
        ("/p07", 7),
        ("/p06", 6),
        ("/a", 5),
        ("/p05", 5),
        ("/z", 5),
    ]


def test_top_paths_cap_distinct_paths_and_count_the_rest_as_other(tracker: ErrorTracker) -> None:
    for i in range(et.MAX_PATHS):
        rec(tracker, path=f"/known/{i}")
    for i in range(50):
        rec(tracker, path=f"/scan/{i}")
    rec(tracker, path="/known/0")  # already tracked paths still count
    top = {t["path"]: t["count"] for t in tracker.stats()["top_paths"]}
    assert top[et.OTHER_PATH] == 50
    assert top["/known/0"] == 2
    assert not any(p.startswith("/scan/") for p in top)


def test_top_paths_clip_very_long_paths(tracker: ErrorTracker) -> None:
    rec(tracker, path="/" + "a" * 10_000)
    (top,) = tracker.stats()["top_paths"]
    assert top["path"] == ("/" + "a" * 10_000)[: et.MAX_PATH_CHARS]


# reset, totals, Prometheus export


def test_reset_zeroes_everything_and_moves_since(tracker: ErrorTracker, clock: FakeClock) -> None:
    for status in (400, 404, 500, 503):
        rec(tracker, status, method="PATCH", path="/x", server="b9")
    clock.advance(12.5)
    tracker.reset()
    stats = tracker.stats()
    assert stats["total_errors"] == 0
    assert tracker.total == 0
    assert stats["error_types"] == {"400_BAD_REQUEST": 0, "404_NOT_FOUND": 0, "500_INTERNAL_ERROR": 0}
    assert stats["by_server"] == {}
    assert stats["by_method"] == {}
    assert stats["recent_errors"] == []
    assert stats["top_paths"] == []
    assert stats["windows"] == {w: {"total": 0, "by_type": {}} for w in ("1m", "5m", "15m")}
    assert stats["since"] == "2023-11-14T22:13:32.500Z"
    # The counts behind lb_errors_total stay: a Prometheus counter never goes back.
    assert tracker.lifetime_counts() == {("b9", 400): 1, ("b9", 404): 1, ("b9", 500): 1, ("b9", 503): 1}


def test_reset_keeps_the_recent_size_and_tracker_keeps_working(clock: FakeClock) -> None:
    tracker = ErrorTracker(recent=2, clock=clock)
    rec(tracker)
    tracker.reset()
    assert tracker.recent == 2
    for i in range(3):
        rec(tracker, request_id=str(i))
    assert request_ids(tracker.stats()) == ["2", "1"]
    assert tracker.stats()["windows"]["1m"]["total"] == 3


def test_lifetime_counts_by_server_and_status(tracker: ErrorTracker) -> None:
    rec(tracker, 404, server="backend-1")
    rec(tracker, 404, server="backend-1")
    rec(tracker, 500, server="backend-1")
    rec(tracker, 599, server="lb")
    assert tracker.lifetime_counts() == {("backend-1", 404): 2, ("backend-1", 500): 1, ("lb", 599): 1}
    tracker.reset()
    rec(tracker, 404, server="backend-1")
    assert tracker.lifetime_counts() == {("backend-1", 404): 3, ("backend-1", 500): 1, ("lb", 599): 1}


def test_lifetime_counts_returns_a_copy(tracker: ErrorTracker) -> None:
    rec(tracker)
    counts = tracker.lifetime_counts()
    counts[("backend-1", 404)] = 99
    assert tracker.lifetime_counts() == {("backend-1", 404): 1}


def test_stats_uses_the_injected_clock_for_since(clock: FakeClock) -> None:
    clock.now = 0.0
    assert ErrorTracker(clock=clock).stats()["since"] == "1970-01-01T00:00:00.000Z"


# bounded memory


def flood(tracker: ErrorTracker, clock: FakeClock, n: int, rng: random.Random) -> None:
    statuses = (400, 404, 500, 502, 503)
    for i in range(n):
        rec(
            tracker,
            statuses[i % len(statuses)],
            path=f"/scan/{rng.getrandbits(64):016x}",
            server=f"backend-{i % 4}",
            request_id=f"{i:x}",
        )
        clock.advance(0.1)


def test_internal_sizes_stay_bounded_after_200k_distinct_paths(clock: FakeClock) -> None:
    tracker = ErrorTracker(clock=clock)
    flood(tracker, clock, 200_000, random.Random(1))
    assert tracker.total == 200_000
    assert len(tracker._records) == 50
    assert len(tracker._paths) <= et.MAX_PATHS + 1
    assert tracker._paths[et.OTHER_PATH] == 200_000 - et.MAX_PATHS
    assert len(tracker._by_method) <= et.MAX_METHODS + 1
    assert tracker._per_second.seconds == 900  # one bucket per second of the widest window
    assert len(tracker._per_second.totals(clock())) <= 5  # keyed by error type, not by path
    assert len(tracker.stats()["recent_errors"]) == 50


@pytest.mark.slow
def test_memory_does_not_grow_while_recording_200k_distinct_paths(clock: FakeClock) -> None:
    tracker = ErrorTracker(clock=clock)
    rng = random.Random(2)
    tracemalloc.start()
    try:
        # Warm up past 15 minutes of clock and past the path cap, so every structure is full.
        flood(tracker, clock, 20_000, rng)
        before, _ = tracemalloc.get_traced_memory()
        flood(tracker, clock, 180_000, rng)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded path tracking would add well over 10 MB here.
    assert after - before < 256 * 1024
