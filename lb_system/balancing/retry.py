"""Retry policy: whether a failed try may be retried, and how many retries may run.

Pure policy, no I/O: the proxy reports what happened and asks.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lb_system.second_ring import SecondRing

__all__ = ["IDEMPOTENT_METHODS", "FailureKind", "RetryBudget", "RetryPolicy"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class FailureKind(enum.Enum):
    """How a try failed."""

    CONNECT = "connect failed: nothing was sent"
    RESET = "connection dropped or reset before the response started"
    TIMEOUT = "per-try timeout"
    STATUS = "answered with a retryable status"


@dataclass(frozen=True)
class RetryPolicy:
    """Which failed tries may be retried, and how many times.

    Methods are compared case-sensitively, as HTTP defines them: "get" is an
    unknown method, hence not treated as idempotent.
    """

    retries: int = 2
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        statuses = frozenset(self.retry_on_status)
        bad = sorted(s for s in statuses if not 100 <= s <= 599)
        if bad:
            raise ValueError(f"retry_on_status holds non-HTTP status codes: {bad}")
        # Accept any iterable of codes but keep the field hashable and immutable.
        object.__setattr__(self, "retry_on_status", statuses)

    def should_retry(
        self,
        *,
        method: str,
        failure: FailureKind,
        attempt: int,
        response_started: bool = False,
        body_replayable: bool = True,
    ) -> bool:
        """May another try follow `attempt` tries (1 after the first) that ended in `failure`?

        Never once a byte of the response reached the client, nor when the
        request body cannot be sent again. A failed connect sent nothing, so
        any method may retry it; other failures may have reached the backend,
        so only idempotent methods retry them.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts tries made so far and starts at 1, got {attempt}")
        if attempt > self.retries or response_started or not body_replayable:
            return False
        if failure is FailureKind.CONNECT:
            return True
        return method in IDEMPOTENT_METHODS

    def retryable_status(self, status: int) -> bool:
        """Is `status` one that earns a retry (FailureKind.STATUS)?"""
        return status in self.retry_on_status


class RetryBudget:
    """Envoy-style retry budget.

    Retries in flight/recent may add at most `percent` of the requests of the
    last `window` seconds, plus a floor of `min_concurrent` concurrent retries.
    The forwarder takes one slot per retried request, whatever its number of retries.
    Counts live in a `SecondRing` (so the window has 1 s granularity and memory is
    bounded by the window length, not by traffic).
    """

    def __init__(
        self,
        percent: float = 20.0,
        *,
        min_concurrent: int = 3,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if percent < 0:
            raise ValueError(f"percent must be >= 0, got {percent}")
        if min_concurrent < 0:
            raise ValueError(f"min_concurrent must be >= 0, got {min_concurrent}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        self._percent = percent
        self._min_concurrent = min_concurrent
        self._clock = clock
        self._window: SecondRing[str] = SecondRing(math.ceil(window))  # "requests", "retries"
        self._active = 0

    @property
    def active(self) -> int:
        """Retries started and not yet released."""
        return self._active

    def on_request(self) -> None:
        """Count one incoming client request."""
        self._window.add(self._clock(), "requests")

    def try_acquire(self) -> bool:
        """May a retry start now? If so it is counted as active and in the window."""
        now = self._clock()
        if self._active < self._min_concurrent:
            allowed = True
        else:
            counts = self._window.totals(now)
            allowed = (counts.get("retries", 0) + 1) * 100 <= self._percent * counts.get("requests", 0)
        if allowed:
            self._active += 1
            self._window.add(now, "retries")
        return allowed

    def release(self) -> None:
        """A retry admitted by try_acquire finished."""
        if self._active == 0:
            raise RuntimeError("release() without a matching successful try_acquire()")
        self._active -= 1
