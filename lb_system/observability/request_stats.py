"""Per-backend latency and error rate, and the balancer's requests per second, from proxied requests.

An `Observer` of proxied requests, read by `/status` and the dashboard. Every structure has a
fixed size (a deque of the last 1000 latencies, rings of per-second buckets), so recording is
O(1) and memory does not grow with traffic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from lb_system.balancing.events import Observer, ProxiedRequest

LATENCY_SAMPLES = 1000
ERROR_RATE_WINDOW_S = 60
RATE_HISTORY_S = 300


class SecondRing:
    """Counts per second over the last `seconds` seconds, in a fixed ring of buckets."""

    def __init__(self, seconds: int, fields: int = 1) -> None:
        self.seconds = seconds
        self._secs = [-1] * seconds
        self._counts = [[0] * fields for _ in range(seconds)]

    def add(self, now: float, *amounts: int) -> None:
        sec = math.floor(now)
        slot = sec % self.seconds
        counts = self._counts[slot]
        if self._secs[slot] != sec:
            # The slot holds a second that has left the window: start it afresh.
            self._secs[slot] = sec
            counts[:] = [0] * len(counts)
        for i, amount in enumerate(amounts):
            counts[i] += amount

    def totals(self, now: float) -> list[int]:
        """Sum of each field over the window ending with the current second."""
        sec = math.floor(now)
        sums = [0] * len(self._counts[0])
        for bucket_sec, counts in zip(self._secs, self._counts):
            if 0 <= sec - bucket_sec < self.seconds:
                for i, count in enumerate(counts):
                    sums[i] += count
        return sums

    def series(self, now: float, field: int = 0) -> list[int]:
        """One count per second, oldest first, the last one being the current second."""
        sec = math.floor(now)
        out = []
        for past in range(sec - self.seconds + 1, sec + 1):
            slot = past % self.seconds
            out.append(self._counts[slot][field] if self._secs[slot] == past else 0)
        return out


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class _BackendWindow:
    def __init__(self) -> None:
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.minute = SecondRing(ERROR_RATE_WINDOW_S, fields=3)  # tries, failed tries, server failures


class RequestStats(Observer):
    """Latency percentiles and last-minute error rate per backend; requests/s for the balancer.

    A try counts as an error when the backend did not answer or answered with status >= 400,
    the same rule the error tracker uses for a failed request.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._backends: dict[str, _BackendWindow] = {}
        self.requests = SecondRing(RATE_HISTORY_S)

    def _window(self, name: str) -> _BackendWindow:
        window = self._backends.get(name)
        if window is None:
            window = self._backends[name] = _BackendWindow()
        return window

    def on_request(self, done: ProxiedRequest) -> None:
        """One call per proxied request."""
        now = self.clock()
        self.requests.add(now, 1)
        for attempt in done.tries:
            window = self._window(attempt.backend)
            status = attempt.status
            window.minute.add(now, 1, int(status is None or status >= 400), int(status is None or status >= 500))
            if attempt.status is not None:
                window.latencies_ms.append(attempt.duration_s * 1000)

    def latency_ms(self, name: str) -> dict[str, float | None]:
        window = self._backends.get(name)
        if window is None or not window.latencies_ms:
            return {"p50": None, "p95": None, "p99": None}
        values = sorted(window.latencies_ms)
        return {key: round(percentile(values, fraction), 2) for key, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))}

    def error_rate(self, name: str) -> float:
        """Failed share of the tries sent to this backend in the last minute; 0.0 with none."""
        window = self._backends.get(name)
        if window is None:
            return 0.0
        tries, failed, _ = window.minute.totals(self.clock())
        return round(failed / tries, 4) if tries else 0.0

    def server_error_rate(self, name: str) -> float:
        """Share of the last minute's tries to this backend that got no answer or a 5xx; 0.0 with none.
        Unlike `error_rate`, clients' own 4xx do not count against the backend."""
        window = self._backends.get(name)
        if window is None:
            return 0.0
        tries, _, server_failed = window.minute.totals(self.clock())
        return round(server_failed / tries, 4) if tries else 0.0

    def backend_fields(self, name: str) -> dict[str, object]:
        return {
            "latency_ms": self.latency_ms(name),
            "error_rate": self.error_rate(name),
            "server_error_rate": self.server_error_rate(name),
        }
