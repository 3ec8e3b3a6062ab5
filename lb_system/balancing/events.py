"""What the balancer reports to its observers: checks, health transitions, tries and proxied
requests, and the one protocol (`Observer`) and guarded loop (`Observers`) that deliver them.

Plain values, made on every request: observability consumes them without importing the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from lb_system.timestamps import iso_utc_or_none

# Who answered when no backend did, as in X-Backend and the error records.
BALANCER = "balancer"


@dataclass(frozen=True)
class Transition:
    at: float
    to: str  # "up" or "down"
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"at": iso_utc_or_none(self.at), "to": self.to, "reason": self.reason}


class TryResult(NamedTuple):
    """One try of a forwarded request on one backend (a tuple: made on every request)."""

    backend: str
    status: int | None  # None: no answer (refused, reset, timed out)
    duration_s: float
    reason: str | None = None  # why there was no answer


def render_tries(tries: Sequence[TryResult]) -> str:
    """`backend-1:503,backend-2:200` for the access line."""
    if len(tries) == 1:  # nearly every request: no generator
        t = tries[0]
        return f"{t.backend}:{t.reason if t.status is None else t.status}"
    return ",".join(f"{t.backend}:{t.reason if t.status is None else t.status}" for t in tries) or "-"


class ProxiedRequest(NamedTuple):
    """What one forwarded request came to, reported to the observers (a tuple: made on every request)."""

    method: str
    status: int
    backend: str  # the backend that answered, or "balancer" for its own 502/503/504
    duration_s: float
    tries: tuple[TryResult, ...]
    no_backend: bool = False  # a 503 for want of a healthy backend
    pool: str | None = None  # the pool the request was routed to; None when it reached none
    request_bytes: int = 0  # the request body sent to the backend that answered
    response_bytes: int = 0  # the answer's body passed to the client

    @property
    def retried_from(self) -> tuple[str, ...]:
        """Backends whose try was followed by another try on a different backend."""
        return tuple(t.backend for t in self.tries[:-1])


class CheckResult(NamedTuple):
    """One active health check of one backend."""

    backend: str
    ok: bool
    status: str  # the HTTP status, or why there was none
    duration_s: float


class Observer(Protocol):
    """What metrics, request stats and the live feed hear about: checks, transitions and proxied
    requests. Subclass it to inherit no-op methods for the events you do not need."""

    def on_check(self, result: CheckResult) -> None:
        """An active health check finished."""
        return None  # a no-op by default, not abstract

    def on_transition(self, backend: str, transition: Transition) -> None:
        """A backend went up or down (its first check included)."""
        return None

    def on_request(self, done: ProxiedRequest) -> None:
        """A forwarded request finished (or its WebSocket handshake was answered)."""
        return None


class Observers(Observer):
    """Every observer of one balancer, called in one guarded loop: an observer that raises is
    logged with its traceback and never stops the caller (the checker, the pool, the forwarder)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("lb_system.events")
        self._observers: list[Observer] = []
        # Those on_request calls: an observer that keeps Observer's no-op (the live feed, the
        # health checker) is not called once per request for nothing.
        self._hearing: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)
        self._hearing = [o for o in self._observers if _hears_requests(o)]

    def remove(self, observer: Observer) -> None:
        self._observers.remove(observer)
        self._hearing = [o for o in self._observers if _hears_requests(o)]

    def __len__(self) -> int:
        return len(self._observers)

    def _each(self, event: str, deliver: Callable[[Observer], None]) -> None:
        # The guarded loop of checks and transitions (on_request inlines it: it runs per request).
        for observer in self._observers:
            try:
                deliver(observer)
            except Exception:
                self._failed(observer, event)

    def _failed(self, observer: Observer, event: str) -> None:
        self.logger.exception("observer failed", extra={"fields": {"observer": type(observer).__name__, "kind": event}})

    def on_check(self, result: CheckResult) -> None:
        self._each("check", lambda observer: observer.on_check(result))

    def on_transition(self, backend: str, transition: Transition) -> None:
        self._each("transition", lambda observer: observer.on_transition(backend, transition))

    def on_request(self, done: ProxiedRequest) -> None:
        # Once per proxied request: the guarded loop inlined, without a closure per call.
        for observer in self._hearing:
            try:
                observer.on_request(done)
            except Exception:
                self._failed(observer, "request")


def _hears_requests(observer: object) -> bool:
    """False for an observer whose on_request is Observer's own no-op (its class's and not its own)."""
    return getattr(type(observer), "on_request", None) is not Observer.on_request or "on_request" in getattr(
        observer, "__dict__", ()
    )
