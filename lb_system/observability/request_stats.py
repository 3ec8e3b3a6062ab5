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
from lb_system.second_ring import SecondRing

LATENCY_SAMPLES = 1000
ERROR_RATE_WINDOW_S = 60
RATE_HISTORY_S = 300
# What a backend's last-minute ring counts.
TRIES, FAILED, SERVER_FAILED = "tries", "failed", "server_failed"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class _BackendWindow:
    def __init__(self) -> None:
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.minute: SecondRing[str] = SecondRing(ERROR_RATE_WINDOW_S)  # TRIES, FAILED, SERVER_FAILED


class RequestStats(Observer):
    """Latency percentiles and last-minute error rate per backend; requests/s for the balancer.

    A try counts as an error when the backend did not answer or answered with status >= 400,
    the same rule the error tracker uses for a failed request.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._backends: dict[str, _BackendWindow] = {}
        self.requests: SecondRing[str] = SecondRing(RATE_HISTORY_S)  # proxied requests per second

    def _window(self, name: str) -> _BackendWindow:
        window = self._backends.get(name)
        if window is None:
            window = self._backends[name] = _BackendWindow()
        return window

    def on_request(self, done: ProxiedRequest) -> None:
        """One call per proxied request."""
        now = self.clock()
        self.requests.add(now, "requests")
        backends = self._backends
        for attempt in done.tries:
            window = backends.get(attempt.backend) or self._window(attempt.backend)
            minute = window.minute
            status = attempt.status
            minute.add(now, TRIES)
            if status is not None and status < 400:  # an answer that counts no failure: the usual try
                window.latencies_ms.append(attempt.duration_s * 1000)
                continue
            if status is None or status >= 500:
                minute.add(now, FAILED)
                minute.add(now, SERVER_FAILED)
            elif status >= 400:
                minute.add(now, FAILED)
            if status is not None:
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
        return self._share(window, FAILED)

    def server_error_rate(self, name: str) -> float:
        """Share of the last minute's tries to this backend that got no answer or a 5xx; 0.0 with none.
        Unlike `error_rate`, clients' own 4xx do not count against the backend."""
        window = self._backends.get(name)
        if window is None:
            return 0.0
        return self._share(window, SERVER_FAILED)

    def _share(self, window: _BackendWindow, key: str) -> float:
        counts = window.minute.totals(self.clock())
        tries = counts.get(TRIES, 0)
        return round(counts.get(key, 0) / tries, 4) if tries else 0.0

    def backend_fields(self, name: str) -> dict[str, object]:
        return {
            "latency_ms": self.latency_ms(name),
            "error_rate": self.error_rate(name),
            "server_error_rate": self.server_error_rate(name),
        }
