"""Benchmark ErrorTracker.record(): time per call and memory growth.

Usage: python benchmarks/error_tracker_bench.py [--n 1000000]

Two passes over the same inputs: one untraced for timing, one under
tracemalloc for memory (tracemalloc slows allocation, so it is kept out of
the timing pass).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb_system.error_tracker import ErrorTracker  # noqa: E402

STATUSES: tuple[int, ...] = (404, 404, 404, 400, 500, 502, 503, 405, 429, 504)
SERVERS: tuple[str, ...] = ("backend-1", "backend-2", "backend-3", "lb")
METHODS: tuple[str, ...] = ("GET", "GET", "POST", "PUT", "DELETE")
DISTINCT_PATHS = 50_000
START = 1_700_000_000.0
STEP = 0.002  # 500 errors per simulated second


class StepClock:
    """A fake clock that moves forward by ``step`` on every read."""

    def __init__(self, start: float, step: float) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def make_paths(count: int) -> list[tuple[str, str | None]]:
    """Return (path, route) pairs; a third carry a route pattern."""
    out: list[tuple[str, str | None]] = []
    for i in range(count):
        if i % 3 == 0:
            out.append((f"/tasks/{i}", "/tasks/{id}"))
        else:
            out.append((f"/scan/{i:08x}/page", None))
    return out


def run(tracker: ErrorTracker, n: int, paths: list[tuple[str, str | None]]) -> float:
    """Record ``n`` errors and return the elapsed seconds."""
    record = tracker.record
    n_paths = len(paths)
    t0 = time.perf_counter()
    for i in range(n):
        path, route = paths[(i * 7919) % n_paths]
        record(
            status=STATUSES[i % 10],
            method=METHODS[i % 5],
            path=path,
            server=SERVERS[i & 3],
            detail="upstream said no",
            request_id="req",
            route=route,
        )
    return time.perf_counter() - t0


def loop_overhead(n: int, paths: list[tuple[str, str | None]]) -> float:
    """Time the same loop with a no-op in place of record()."""

    def noop(**_: object) -> None:
        return None

    n_paths = len(paths)
    t0 = time.perf_counter()
    for i in range(n):
        path, route = paths[(i * 7919) % n_paths]
        noop(
            status=STATUSES[i % 10],
            method=METHODS[i % 5],
            path=path,
            server=SERVERS[i & 3],
            detail="upstream said no",
            request_id="req",
            route=route,
        )
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="errors to record")
    args = parser.parse_args(argv)
    n: int = args.n
    paths = make_paths(DISTINCT_PATHS)

    tracker = ErrorTracker(clock=StepClock(START, STEP))
    elapsed = run(tracker, n, paths)
    overhead = loop_overhead(n, paths)
    t0 = time.perf_counter()
    stats = tracker.stats()
    stats_ms = (time.perf_counter() - t0) * 1000

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    traced = ErrorTracker(clock=StepClock(START, STEP))
    empty, _ = tracemalloc.get_traced_memory()
    run(traced, n, paths)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    per_record = elapsed / n * 1e9
    print(f"records:             {n:,} ({DISTINCT_PATHS:,} distinct paths, {n * STEP:,.0f} s of clock)")
    print(f"time per record:     {per_record:,.0f} ns (loop alone {overhead / n * 1e9:,.0f} ns, "
          f"record() ~{(elapsed - overhead) / n * 1e9:,.0f} ns)")
    print(f"total record time:   {elapsed:.2f} s")
    print(f"stats() time:        {stats_ms:.2f} ms")
    print(f"empty tracker:       {(empty - base) / 1024:,.1f} KiB")
    print(f"memory growth:       current {(current - empty) / 1024:,.1f} KiB, "
          f"peak {(peak - empty) / 1024:,.1f} KiB (after construction)")
    print(f"total_errors:        {stats['total_errors']:,}")
    print(f"len(recent_errors):  {len(stats['recent_errors'])}")
    print(f"top_paths[0]:        {stats['top_paths'][0] if stats['top_paths'] else None}")


if __name__ == "__main__":
    main()
