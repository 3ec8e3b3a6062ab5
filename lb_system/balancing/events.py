"""What the balancer reports to its observers: tries, proxied requests and health transitions.

Plain values, made on every request: observability consumes them without importing the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    return ",".join(f"{t.backend}:{t.reason if t.status is None else t.status}" for t in tries) or "-"


class ProxiedRequest(NamedTuple):
    """What one forwarded request came to, reported to the forwarder's listeners (a tuple: made on every request)."""

    method: str
    status: int
    backend: str  # the backend that answered, or "balancer" for its own 502/503/504
    duration_s: float
    tries: tuple[TryResult, ...]
    no_backend: bool = False  # a 503 for want of a healthy backend

    @property
    def retried_from(self) -> tuple[str, ...]:
        """Backends whose try was followed by another try on a different backend."""
        return tuple(t.backend for t in self.tries[:-1])


RequestListener = Callable[[ProxiedRequest], None]
