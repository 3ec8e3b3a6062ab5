"""Benchmark ErrorTracker.record(): time per call and memory growth.

Usage: python benchmarks/error_tracker_bench.py [--n 1000000] [--mem-n 200000]

The timing pass records N errors untraced. tracemalloc makes record() about
7x slower, so the memory pass traces a fresh tracker over ``--mem-n`` errors
(default min(N, 200000), enough to fill every bounded structure) and also
reports the growth over its second half, which should be about zero.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb_system.observability.error_tracker import ErrorTracker  # noqa: E402

STATUSES: tuple[int, ...] = (404, 404, 404, 400, 500, 502, 503, 405, 429, 504)
SERVERS: tuple[str, ...] = ("backend-1", "backend-2", "backend-3", "lb")
METHODS: tuple[str, ...] = ("GET", "GET", "POST", "PUT", "DELETE")
DISTINCT_PATHS = 50_000
START = 1_700_000_000.0
STEP = 0.01  # 100 errors per simulated second, so 100k records span > 15 min


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


def run(tracker: ErrorTracker, n: int, paths: list[tuple[str, str | None]], start: int = 0) -> float:
    """Record errors ``start`` .. ``n - 1`` and return the elapsed seconds."""
    record = tracker.record
    n_paths = len(paths)
    t0 = time.perf_counter()
    for i in range(start, n):
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
    parser = argparse.ArgumentParser(description="Benchmark ErrorTracker.record().")
    parser.add_argument("--n", type=int, default=1_000_000, help="errors to record in the timing pass")
    parser.add_argument("--mem-n", type=int, default=None, help="errors to record under tracemalloc")
    args = parser.parse_args(argv)
    n: int = args.n
    mem_n: int = min(n, 200_000) if args.mem_n is None else args.mem_n
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
    run(traced, mem_n // 2, paths)
    half, _ = tracemalloc.get_traced_memory()
    run(traced, mem_n, paths, start=mem_n // 2)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    kib = 1024
    print(f"timing pass:         {n:,} records, {DISTINCT_PATHS:,} distinct paths, {n * STEP:,.0f} s of clock")
    print(
        f"time per record:     {elapsed / n * 1e9:,.0f} ns "
        f"(loop alone {overhead / n * 1e9:,.0f} ns, so record() ~{(elapsed - overhead) / n * 1e9:,.0f} ns)"
    )
    print(f"total record time:   {elapsed:.2f} s")
    print(f"stats() time:        {stats_ms:.2f} ms")
    print(f"total_errors:        {stats['total_errors']:,}")
    print(f"len(recent_errors):  {len(stats['recent_errors'])}")
    print(f"top_paths[0]:        {stats['top_paths'][0] if stats['top_paths'] else None}")
    print(f"memory pass:         {mem_n:,} records under tracemalloc")
    print(f"empty tracker:       {(empty - base) / kib:,.1f} KiB")
    print(f"growth after build:  current {(current - empty) / kib:,.1f} KiB, peak {(peak - empty) / kib:,.1f} KiB")
    print(f"growth, second half: {(current - half) / kib:,.1f} KiB")


if __name__ == "__main__":
    main()
