"""The one per-second ring behind the error tracker, the request stats and the retry budget:
windows exact to one second, buckets reused lazily, clock steps back. Fake clocks, no sleeping."""

from __future__ import annotations

import math
import random

import pytest
from support.clock import T0, FakeClock

from lb_system.second_ring import SecondRing


def test_series_is_oldest_first_ending_now(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(5)
    ring.add(clock(), "a", 2)
    clock.advance(2)
    ring.add(clock(), "a")
    assert ring.series(clock()) == [0, 0, 2, 0, 1]
    clock.advance(3)
    assert ring.series(clock()) == [0, 1, 0, 0, 0]
    clock.advance(10)
    assert ring.series(clock()) == [0, 0, 0, 0, 0]
    assert ring.totals(clock()) == {}


def test_counts_are_kept_per_key_and_summed_over_any_window_within_the_ring(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(10)
    for key in ("tries", "tries", "failed"):
        ring.add(clock(), key)
    clock.advance(5)
    ring.add(clock(), "tries")
    assert ring.totals(clock()) == {"tries": 3, "failed": 1}
    assert ring.totals(clock(), 5) == {"tries": 1}
    assert ring.total(clock(), "tries", 6) == 3 and ring.total(clock(), "nothing") == 0
    assert ring.series(clock(), "failed", 6) == [1, 0, 0, 0, 0, 0]
    assert ring.series(clock(), seconds=6) == [3, 0, 0, 0, 0, 1]  # every key together
    with pytest.raises(ValueError):
        ring.totals(clock(), 11)
    with pytest.raises(ValueError):
        SecondRing(0)


def test_windows_are_exact_to_one_second(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(60)
    clock.now = T0 + 0.9
    ring.add(clock(), "x")
    clock.now = T0 + 59.99
    assert ring.total(clock(), "x") == 1
    clock.now = T0 + 60.0
    assert ring.total(clock(), "x") == 0


def test_a_bucket_from_exactly_one_ring_ago_is_not_reused(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(60)
    ring.add(clock(), "old")
    clock.advance(60)  # the same slot
    ring.add(clock(), "new")
    assert ring.totals(clock()) == {"new": 1}


def test_a_small_step_back_counts_in_the_newest_second(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(60)
    ring.add(clock(), "x")
    clock.advance(-30)
    ring.add(clock(), "x")
    assert ring.series(clock(), "x", 2) == [0, 2]  # both are the newest events
    clock.advance(59)  # 29 s past the newest second: both still in the last minute
    assert ring.total(clock(), "x") == 2


def test_a_step_back_of_a_whole_ring_forgets_everything(clock: FakeClock) -> None:
    ring: SecondRing[str] = SecondRing(60)
    ring.add(clock(), "x")
    clock.advance(-60)
    assert ring.totals(clock()) == {}
    ring.add(clock(), "y")
    assert ring.totals(clock()) == {"y": 1}


def test_a_long_run_keeps_exactly_the_window(clock: FakeClock) -> None:
    ring: SecondRing[int] = SecondRing(900)
    for _ in range(2000):
        clock.advance(1)
        ring.add(clock(), 404)
    assert [ring.total(clock(), 404, s) for s in (60, 300, 900)] == [60, 300, 900]
    ring.clear()
    assert ring.totals(clock()) == {}


class _Model:
    """The ring's rules written plainly, to check its shortcut for the newest second against."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.counts: dict[tuple[int, str], int] = {}
        self.newest: int | None = None

    def now(self, now: float) -> int:
        sec = math.floor(now)
        if self.newest is None or sec >= self.newest or self.newest - sec >= self.seconds:
            if self.newest is not None and self.newest - sec >= self.seconds:
                self.counts = {}
            self.newest = sec
        return self.newest

    def add(self, now: float, key: str) -> None:
        sec = self.now(now)
        self.counts[sec, key] = self.counts.get((sec, key), 0) + 1

    def series(self, now: float, key: str) -> list[int]:
        end = self.now(now)
        return [self.counts.get((sec, key), 0) for sec in range(end - self.seconds + 1, end + 1)]


def test_adds_in_the_newest_second_agree_with_the_plain_rules_across_boundaries_reads_and_steps_back() -> None:
    # Times bunched around second boundaries, reads that move the window's end between adds,
    # small and whole-ring steps back, clear(): every way the newest second's shortcut could go stale.
    rng = random.Random(19)
    ring: SecondRing[str] = SecondRing(5)
    model = _Model(5)
    now = T0
    for step in range(5000):
        roll = rng.random()
        if roll < 0.6:
            now += rng.choice((0.0, 0.001, 0.3, 0.999, 1.0))
        elif roll < 0.7:
            now = math.floor(now) + 1 - 1e-9
        elif roll < 0.8:
            now -= rng.choice((0.5, 2.0, 7.0))
        elif roll < 0.85:
            now += rng.choice((3.0, 12.0))
        key = rng.choice("ab")
        if rng.random() < 0.15:
            assert ring.series(now, key) == model.series(now, key), step
        else:
            ring.add(now, key)
            model.add(now, key)
        if rng.random() < 0.002:
            ring.clear()
            model.counts = {}
    assert ring.series(now, "a") == model.series(now, "a")
