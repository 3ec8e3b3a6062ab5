"""Counts per second over a sliding window, in a fixed ring of one bucket per second.

The one ring behind the error tracker's windows, the request stats' rates and error shares,
and the retry budget. It sits in the lowest layer, beside config and timestamps, so that the
balancing policy and the observers can both use it and the task API (which records errors)
still imports nothing of the balancer. Recording is O(1): a bucket is found by second modulo the ring size
and emptied lazily when it still holds a second that has left the window. Memory is bounded
by the window length and the number of keys, never by traffic.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["SecondRing"]

K = TypeVar("K", bound=Hashable)

_EMPTY = -(2**62)  # the second an unused bucket claims to hold: older than any window


class SecondRing(Generic[K]):
    """Counts by key for each of the last `seconds` seconds.

    The newest second seen is the window's end. When the clock steps back by less than the
    window, later counts still go to that newest second (they are the newest events); when it
    steps back by a whole window or more, everything held is stale and is forgotten.
    """

    __slots__ = ("_counts", "_hot", "_hot_end", "_hot_start", "_newest", "_secs", "seconds")

    def __init__(self, seconds: int) -> None:
        if seconds < 1:
            raise ValueError(f"seconds must be >= 1, got {seconds}")
        self.seconds = seconds
        self._secs = [_EMPTY] * seconds
        self._counts: list[dict[K, int]] = [{} for _ in range(seconds)]
        self._newest = _EMPTY
        # The newest second's bucket and its bounds, [start, end): `add` within it skips the
        # floor, the modulo and the bucket's check. Forgotten when the newest second moves on.
        self._hot: dict[K, int] = {}
        self._hot_start, self._hot_end = math.inf, -math.inf

    def _now(self, now: float) -> int:
        """The second `now` counts in: the newest one seen unless time moved on."""
        sec = math.floor(now)
        newest = self._newest
        if sec >= newest:
            if sec != newest:
                self._newest = sec
                self._hot_start, self._hot_end = math.inf, -math.inf
            return sec
        if newest - sec >= self.seconds:
            self.clear()  # a big step back: what the ring holds is noise
            self._newest = sec
            return sec
        return newest

    def add(self, now: float, key: K, amount: int = 1) -> None:
        """Count `amount` of `key` in the second of `now`."""
        if self._hot_start <= now < self._hot_end:  # the newest second again: nearly every call
            hot = self._hot
            hot[key] = hot.get(key, 0) + amount
            return
        sec = self._now(now)
        slot = sec % self.seconds
        counts = self._counts[slot]
        if self._secs[slot] != sec:
            # The slot holds a second that has left the window: start it afresh.
            self._secs[slot] = sec
            counts.clear()
        counts[key] = counts.get(key, 0) + amount
        if sec == self._newest:
            self._hot, self._hot_start, self._hot_end = counts, sec, sec + 1

    def _window(self, now: float, seconds: int | None) -> tuple[int, int]:
        """The last second and the length of a window ending now."""
        if seconds is None:
            seconds = self.seconds
        elif not 0 < seconds <= self.seconds:
            raise ValueError(f"seconds must be 1-{self.seconds}, not {seconds}")
        return self._now(now), seconds

    def totals(self, now: float, seconds: int | None = None) -> dict[K, int]:
        """Each key's count over the last `seconds` (the whole ring by default), ending now."""
        end, seconds = self._window(now, seconds)
        sums: dict[K, int] = {}
        for sec in range(end - seconds + 1, end + 1):
            slot = sec % self.seconds
            if self._secs[slot] == sec:
                for key, count in self._counts[slot].items():
                    sums[key] = sums.get(key, 0) + count
        return sums

    def total(self, now: float, key: K, seconds: int | None = None) -> int:
        """One key's count over the last `seconds` (the whole ring by default), ending now."""
        end, seconds = self._window(now, seconds)
        out = 0
        for sec in range(end - seconds + 1, end + 1):
            slot = sec % self.seconds
            if self._secs[slot] == sec:
                out += self._counts[slot].get(key, 0)
        return out

    def series(self, now: float, key: K | None = None, seconds: int | None = None) -> list[int]:
        """One count per second, oldest first, the last being the current second: of `key`,
        or of every key together when it is None."""
        end, seconds = self._window(now, seconds)
        out = []
        for sec in range(end - seconds + 1, end + 1):
            slot = sec % self.seconds
            if self._secs[slot] != sec:
                out.append(0)
            elif key is None:
                out.append(sum(self._counts[slot].values()))
            else:
                out.append(self._counts[slot].get(key, 0))
        return out

    def clear(self) -> None:
        """Forget every count."""
        self._hot_start, self._hot_end = math.inf, -math.inf
        self._secs = [_EMPTY] * self.seconds
        for counts in self._counts:
            counts.clear()
