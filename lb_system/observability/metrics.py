"""Prometheus metrics for one system, in a registry of its own (never the library's global one,
so several systems in one process, as in the tests, do not collide).

Events (proxied requests, health checks, transitions) are counted as they happen: Metrics is an
`Observer` of the balancer. State (up/down, active requests) and the
error counts are read at scrape time, so they always agree with `/status` and `/errors/stats`.
Labels stay low-cardinality: backend names come from the config, methods outside
the standard set are "OTHER", never a raw path or id. No `*_created` series are exported, and
the process, platform and GC collectors report on the process itself.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate
from typing import TypeAlias

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lb_system.balancing.events import BALANCER, CheckResult, Observer, ProxiedRequest, Transition
from lb_system.balancing.pool import ADMIN_STATES, BackendPool
from lb_system.balancing.pools import Pools
from lb_system.observability.error_tracker import ErrorTracker, error_type

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


_Gauge: TypeAlias = GaugeMetricFamily
_Counter: TypeAlias = CounterMetricFamily


class _ScrapeTimeState(Collector):
    """Gauges and error counters computed from the live objects on each scrape."""

    def __init__(self, pools: Pools, tracker: ErrorTracker) -> None:
        self.pools = pools
        self.tracker = tracker

    def _families(self) -> tuple[_Gauge, _Gauge, _Gauge, _Gauge, _Counter, _Counter]:
        return (
            GaugeMetricFamily("lb_backend_up", "1 when the backend is up, else 0.", labels=["backend"]),
            GaugeMetricFamily(
                "lb_backend_serving",
                "1 when the backend gets new requests: up, enabled, not draining or retiring.",
                labels=["backend"],
            ),
            # A state set in the text format: one series per state, 1 for the current one.
            GaugeMetricFamily(
                "lb_backend_admin_state", "The backend's admin state: 1 for the current one.", labels=["backend", "state"]
            ),
            GaugeMetricFamily("lb_backend_active_requests", "Requests in flight to the backend.", labels=["backend"]),
            CounterMetricFamily(
                "lb_backend_ejections", "Passive ejections: failed proxied requests took it down.", labels=["backend"]
            ),
            CounterMetricFamily(
                "lb_errors",
                "Failed requests (status >= 400) as in /errors/stats, never reset; backend is balancer for its own answers.",
                labels=["backend", "code", "type"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        up, serving, admin_state, active, ejections, errors = families
        for backend in self.pools.backends:
            name = backend.name
            up.add_metric([name], 1.0 if backend.healthy else 0.0)
            serving.add_metric([name], 1.0 if backend.serving else 0.0)
            for state in ADMIN_STATES:
                admin_state.add_metric([name, state], 1.0 if backend.admin_state == state else 0.0)
            active.add_metric([name], float(backend.active_requests))
            ejections.add_metric([name], float(backend.ejections))
        for (server, status), count in sorted(self.tracker.lifetime_counts().items()):
            errors.add_metric([server, str(status), error_type(status)], float(count))
        return families


# The histogram's `le` labels, as prometheus_client writes them.
_BOUNDS = (*(floatToGoString(bound) for bound in DURATION_BUCKETS), "+Inf")


class _Durations:
    """One backend's request durations: a count per bucket (the last one +Inf, not cumulative) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0


class _Series:
    """One (pool, backend, method, status)'s count, and its (pool, backend)'s durations."""

    __slots__ = ("count", "durations")

    def __init__(self, durations: _Durations) -> None:
        self.count = 0
        self.durations = durations


class _ProxiedSeries(Collector):
    """`lb_requests_total` and `lb_request_duration_seconds`, counted in plain dicts and lists on
    every proxied request and rendered as families at scrape time: prometheus_client's labelled
    children take a lock and check their type on each call, a cost paid per request here."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        # (pool, backend, method, status) -> its count and durations; the pool is None while requests are not routed.
        self.series: dict[tuple[str | None, str, str, int], _Series] = {}
        self.durations: dict[tuple[str | None, str], _Durations] = {}

    def new_series(self, pool: str | None, backend: str, method: str, status: int) -> _Series:
        """The series of a key first seen (Metrics.on_request counts into it)."""
        durations = self.durations.get((pool, backend))
        if durations is None:
            durations = self.durations[pool, backend] = _Durations()
        series = self.series[pool, backend, method, status] = _Series(durations)
        return series

    def describe(self) -> Iterable[Metric]:
        return self._families(False)

    def _families(self, routed: bool) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        pool = ["pool"] if routed else []
        return (
            CounterMetricFamily(
                "lb_requests",
                "Proxied requests by answering backend, method and status (and pool, when requests are routed).",
                labels=["backend", "method", "code", *pool],
            ),
            HistogramMetricFamily(
                "lb_request_duration_seconds",
                "Time from receiving a proxied request to finishing its response.",
                labels=["backend", *pool],
            ),
        )

    def collect(self) -> Iterable[Metric]:
        routed = self.pools.routed
        requests, durations = self._families(routed)
        # Series counted before a reload changed whether requests are routed merge into the labels shown now.
        counts: dict[tuple[str, ...], int] = {}
        for (pool, backend, method, status), series in self.series.items():
            labels = (backend, method, str(status), *([pool or ""] if routed else []))
            counts[labels] = counts.get(labels, 0) + series.count
        for labels, count in counts.items():
            requests.add_metric(list(labels), float(count))
        merged: dict[tuple[str, ...], _Durations] = {}
        for (pool, backend), counted in self.durations.items():
            labels = (backend, *([pool or ""] if routed else []))
            into = merged.get(labels)
            if into is None:
                merged[labels] = counted
                continue
            sums = _Durations()
            sums.counts = [a + b for a, b in zip(into.counts, counted.counts, strict=True)]
            sums.total = into.total + counted.total
            merged[labels] = sums
        for labels, counted in merged.items():
            cumulative = map(float, accumulate(counted.counts))
            durations.add_metric(list(labels), list(zip(_BOUNDS, cumulative, strict=True)), counted.total)
        return requests, durations


class _ByteCounts(Collector):
    """`lb_request_bytes_total` and `lb_response_bytes_total` by backend, counted in a plain dict
    per proxied request and rendered at scrape time, as `lb_requests_total` is."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # backend -> [request bytes, response bytes]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "lb_request_bytes", "Request body bytes sent to backends, by the backend that answered.", labels=["backend"]
            ),
            CounterMetricFamily(
                "lb_response_bytes", "Answer body bytes passed from backends to clients, by backend.", labels=["backend"]
            ),
        )

    def collect(self) -> Iterable[Metric]:
        sent, received = self._families()
        for backend, (request_bytes, response_bytes) in self.counts.items():
            sent.add_metric([backend], float(request_bytes))
            received.add_metric([backend], float(response_bytes))
        return sent, received


class _WithoutCreated(Collector):
    """The registry's metrics minus the `*_created` samples. prometheus_client can only turn
    those off for the whole process (`disable_created_metrics`); this keeps it per registry.
    While requests are routed, every sample with a `backend` label also gets its `pool`."""

    def __init__(self, registry: CollectorRegistry, pools: Pools) -> None:
        self.registry = registry
        self.pools = pools

    def collect(self) -> Iterable[Metric]:
        pools = self.pools
        pool_of = {b.name: b.pool for b in (*pools.retiring, *pools.backends)} if pools.routed else None
        for metric in self.registry.collect():
            created = metric.name + "_created"
            # Each collect() builds fresh Metric objects, so filtering in place touches nothing shared.
            samples = [sample for sample in metric.samples if sample.name != created]
            if pool_of is not None:
                samples = [
                    s._replace(labels=s.labels | {"pool": pool_of.get(s.labels["backend"], "")})
                    if "backend" in s.labels and "pool" not in s.labels
                    else s
                    for s in samples
                ]
            metric.samples = samples
            yield metric


class Metrics(Observer):
    """Every `lb_*` metric of one system, and its text exposition for `GET /metrics`."""

    def __init__(self, pools: Pools | BackendPool, tracker: ErrorTracker) -> None:
        if isinstance(pools, BackendPool):
            pools = Pools.around(pools)
        self.registry = CollectorRegistry()
        r = self.registry
        self.pools = pools
        self.proxied = _ProxiedSeries(pools)
        r.register(self.proxied)
        self.bytes = _ByteCounts()
        r.register(self.bytes)
        self.health_checks = Counter("lb_health_checks", "Active health checks.", ["backend", "result"], registry=r)
        self.health_check_duration = Histogram(
            "lb_health_check_duration_seconds",
            "Duration of active health checks.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "lb_backend_transitions", "Backend state changes, the first check included.", ["backend", "to"], registry=r
        )
        self.retries = Counter("lb_retries", "Retries away from a backend whose try failed.", ["backend"], registry=r)
        self.no_backend = Counter("lb_no_backend", "503 answers for want of a healthy backend.", registry=r)
        r.register(_ScrapeTimeState(pools, tracker))
        # The process's CPU, memory, file descriptors, GC and Python version (process_* on Linux only).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._exported = _WithoutCreated(r, pools)
        # Zero series from the start, so rate() and alerts see the first increase.
        for backend in pools.backends:
            for result in ("ok", "failed"):
                self.health_checks.labels(backend.name, result)
            for to in ("up", "down"):
                self.transitions.labels(backend.name, to)
            self.retries.labels(backend.name)

    def on_request(self, done: ProxiedRequest) -> None:
        # Counted here, not through a call per family: once per proxied request.
        method, status, backend, seconds, tries, no_backend, pool, request_bytes, response_bytes = done
        if not self.pools.routed:
            pool = None
        if method not in _METHODS:  # bounded as the labels are: config names, standard methods, status codes
            method = "OTHER"
        proxied = self.proxied
        series = proxied.series.get((pool, backend, method, status))  # the series holds its durations too
        if series is None:
            series = proxied.new_series(pool, backend, method, status)
        series.count += 1
        durations = series.durations
        durations.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1  # `le`: a value on a bound counts in its bucket
        durations.total += seconds
        if request_bytes or response_bytes:
            counts = self.bytes.counts.get(backend)
            if counts is None:
                counts = self.bytes.counts[backend] = [0, 0]
            counts[0] += request_bytes
            counts[1] += response_bytes
        if len(tries) > 1:
            for name in done.retried_from:
                self.retries.labels(name).inc()
        if no_backend:
            self.no_backend.inc()

    def count_own_answer(self, method: str, status: int, seconds: float) -> None:
        """An answer of the balancer's own that `lb_requests_total` counts as the balancer's
        (its /health while unavailable), beside those of proxied requests."""
        self.on_request(ProxiedRequest(method, status, BALANCER, seconds, ()))

    def on_check(self, result: CheckResult) -> None:
        self.health_checks.labels(result.backend, "ok" if result.ok else "failed").inc()
        self.health_check_duration.labels(result.backend).observe(result.duration_s)

    def on_transition(self, backend: str, transition: Transition) -> None:
        self.transitions.labels(backend, transition.to).inc()

    def exposition(self) -> bytes:
        return generate_latest(self._exported)
