"""One classification of a failed exchange with a backend, for the forwarder and the health
checks alike: the retry policy's kind, the reason users see, and whether the backend is to blame
(httpx maps httpcore's exceptions once, in `map_exceptions`; this is that one place)."""

from __future__ import annotations

from dataclasses import dataclass

from lb_system.balancing.retry import FailureKind
from lb_system.upstream import HeadTooLarge, PoolTimeout, Timeout, UpstreamError
from lb_system.upstream.errors import TIMEOUT


@dataclass(frozen=True, slots=True)
class Failure:
    """How a try failed: `kind` for the retry policy, `reason` for logs, `tries=`, `/errors/stats`
    and the 502 body, `blames_backend` for passive ejection; `refused_answer` when the backend
    did answer, but past a bound the balancer keeps (its 502 then says just that)."""

    kind: FailureKind
    reason: str
    blames_backend: bool = True
    refused_answer: bool = False


def classify(error: BaseException) -> Failure:
    """The one mapping from what the transport (or a timeout scope) raised to a Failure."""
    if isinstance(error, UpstreamError):
        if isinstance(error, Timeout):  # the try's time ran out, wherever it was spent
            # Waiting for our own pool says the balancer is busy, nothing about the backend.
            return Failure(FailureKind.TIMEOUT, error.reason, blames_backend=not isinstance(error, PoolTimeout))
        if error.connecting:  # nothing reached the backend: safe to retry any method
            return Failure(FailureKind.CONNECT, error.reason)
        return Failure(FailureKind.RESET, error.reason, refused_answer=isinstance(error, HeadTooLarge))
    if isinstance(error, TimeoutError):
        return Failure(FailureKind.TIMEOUT, TIMEOUT)
    # Not seen so far: blamed on the try, as any failure to get an answer.
    return Failure(FailureKind.RESET, type(error).__name__)
