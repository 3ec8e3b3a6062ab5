"""In-memory error tracking for the balancer and its backends.

Everything runs on one asyncio event loop, so there are no locks. Every
structure is bounded: a ``deque`` of the newest records, a fixed ring of
per-second buckets for the rolling windows, and capped counters for paths
and methods, so a flood of errors or a scan of random URLs cannot grow
memory without bound.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from lb_system.second_ring import SecondRing
from lb_system.timestamps import iso_utc

__all__ = ["ErrorTracker", "error_type"]

# The original project called 500 "INTERNAL_ERROR"; dashboards depend on it.
_TYPE_NAMES: Mapping[int, str] = MappingProxyType(
    {s.value: f"{s.value}_{s.name}" for s in HTTPStatus} | {500: "500_INTERNAL_ERROR"}
)
_ALWAYS_PRESENT_TYPES: tuple[str, ...] = ("400_BAD_REQUEST", "404_NOT_FOUND", "500_INTERNAL_ERROR")

_WINDOWS: tuple[tuple[str, int], ...] = (("1m", 60), ("5m", 300), ("15m", 900))
_BUCKET_COUNT = 900  # one bucket per second, covering the widest window

MAX_PATHS = 1000
MAX_METHODS = 16
OTHER_PATH = "(other)"
OTHER_METHOD = "OTHER"
TOP_PATHS = 10
# Clip long strings so that the caps above also bound bytes, not just entries.
MAX_PATH_CHARS = 256
MAX_METHOD_CHARS = 32
MAX_DETAIL_CHARS = 1000


def error_type(status: int) -> str:
    """Return the error type label for an HTTP status, e.g. ``404_NOT_FOUND``.

    500 is ``500_INTERNAL_ERROR``; codes unknown to ``HTTPStatus`` are ``<code>_UNKNOWN``.
    """
    name = _TYPE_NAMES.get(status)
    return name if name is not None else f"{status}_UNKNOWN"


# (timestamp, status, type, method, path, server, detail, request_id, (pool, route) or None); a
# plain tuple because building a NamedTuple costs a quarter of record().
_Record = tuple[float, int, str, str, str, str, str, str, "tuple[str | None, str] | None"]


def _count_bounded(counts: dict[str, int], key: str, max_keys: int, overflow: str) -> None:
    """Count `key`; once `max_keys` distinct keys are held, new ones count under `overflow` (memory stays bounded)."""
    if key not in counts and len(counts) >= max_keys:
        key = overflow
    counts[key] = counts.get(key, 0) + 1


class ErrorTracker:
    """Counts failed requests and keeps the newest ones for inspection.

    ``record()`` is O(1). The rolling ``windows`` in ``stats()`` use a ring
    of per-second buckets, so they are exact to one second: the "1m" window
    holds the current second plus the 59 before it.
    """

    def __init__(self, recent: int = 50, *, clock: Callable[[], float] = time.time) -> None:
        """Keep the newest ``recent`` records; ``clock`` returns POSIX seconds."""
        self._clock = clock
        self._records: deque[_Record] = deque(maxlen=self._check_recent(recent))
        # (server, status) -> errors since creation, never reset: behind the monotonic lb_errors_total.
        # Bounded: server names come from the config, statuses are 400-599.
        self._lifetime: dict[tuple[str, int], int] = {}
        self._reset_counters()

    @staticmethod
    def _check_recent(recent: int) -> int:
        if isinstance(recent, bool) or not isinstance(recent, int):
            raise TypeError(f"recent must be an int, not {type(recent).__name__}")
        if recent < 0:
            raise ValueError(f"recent must be >= 0, not {recent}")
        return recent

    def _reset_counters(self) -> None:
        self._total = 0
        self._since = self._clock()
        self._by_server_type: dict[tuple[str, str], int] = {}
        self._by_method: dict[str, int] = {}
        self._paths: dict[str, int] = {}
        self._per_second: SecondRing[str] = SecondRing(_BUCKET_COUNT)  # error type -> count

    @property
    def recent(self) -> int:
        """How many of the newest records are kept."""
        maxlen = self._records.maxlen
        assert maxlen is not None
        return maxlen

    @recent.setter
    def recent(self, value: int) -> None:
        self._records = deque(self._records, maxlen=self._check_recent(value))

    @property
    def total(self) -> int:
        """Errors recorded since creation or the last ``reset()``."""
        return self._total

    def record(
        self,
        *,
        status: int,
        method: str,
        path: str,
        server: str,
        detail: str,
        request_id: str,
        route: str | None = None,
        routed: tuple[str | None, str] | None = None,
    ) -> None:
        """Record one failed request; ``route`` is its route pattern when known, ``routed`` the pool
        and the [[routes]] entry that sent it there, when requests are sorted into pools."""
        now = self._clock()
        etype = error_type(status)
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[:MAX_DETAIL_CHARS]
        self._records.append((now, status, etype, method, path, server, detail, request_id, routed))
        self._total += 1

        key = (server, etype)
        self._by_server_type[key] = self._by_server_type.get(key, 0) + 1
        lifetime_key = (server, status)
        self._lifetime[lifetime_key] = self._lifetime.get(lifetime_key, 0) + 1

        _count_bounded(self._by_method, method[:MAX_METHOD_CHARS], MAX_METHODS, OTHER_METHOD)
        _count_bounded(self._paths, (path if route is None else route)[:MAX_PATH_CHARS], MAX_PATHS, OTHER_PATH)

        self._per_second.add(now, etype)

    def stats(
        self,
        *,
        server: str | None = None,
        status: int | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Return a JSON-able summary; the filters and ``limit`` apply only to ``recent_errors``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")

        error_types = dict.fromkeys(_ALWAYS_PRESENT_TYPES, 0)
        by_server: dict[str, int] = {}
        for (srv, etype), count in self._by_server_type.items():
            error_types[etype] = error_types.get(etype, 0) + count
            by_server[srv] = by_server.get(srv, 0) + count

        return {
            "total_errors": self._total,
            "error_types": dict(sorted(error_types.items())),
            "by_server": dict(sorted(by_server.items())),
            "recent_errors": self._recent_errors(server, status, limit),
            "since": iso_utc(self._since),
            "by_method": dict(sorted(self._by_method.items())),
            "windows": self._windows(),
            "top_paths": [
                {"path": path, "count": count}
                for path, count in heapq.nsmallest(TOP_PATHS, self._paths.items(), key=lambda item: (-item[1], item[0]))
            ],
        }

    def _recent_errors(self, server: str | None, status: int | None, limit: int | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if limit == 0:
            return out
        for ts, rec_status, etype, method, path, rec_server, detail, request_id, routed in reversed(self._records):
            if server is not None and rec_server != server:
                continue
            if status is not None and rec_status != status:
                continue
            record = {
                "timestamp": iso_utc(ts),
                "status": rec_status,
                "type": etype,
                "method": method,
                "path": path,
                "server": rec_server,
                "detail": detail,
                "request_id": request_id,
            }
            if routed is not None:
                record["pool"], record["route"] = routed
            out.append(record)
            if limit is not None and len(out) >= limit:
                break
        return out

    def _windows(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        out = {}
        for name, seconds in _WINDOWS:
            by_type = self._per_second.totals(now, seconds)
            out[name] = {"total": sum(by_type.values()), "by_type": dict(sorted(by_type.items()))}
        return out

    def per_second(self, seconds: int = 300) -> list[int]:
        """Errors per second over the last ``seconds`` (at most 900), oldest first, ending now."""
        return self._per_second.series(self._clock(), seconds=seconds)

    def reset(self) -> None:
        """Forget every record and counter of the document; ``since`` becomes now.
        The lifetime counts behind ``lb_errors_total`` stay: Prometheus counters never go back."""
        self._records.clear()
        self._reset_counters()

    def lifetime_counts(self) -> dict[tuple[str, int], int]:
        """Errors since creation keyed by ``(server, status)``, never reset, for ``lb_errors_total``."""
        return dict(self._lifetime)
