"""Micro-benchmark of one access line: µs per line in the caller (the event loop's cost: build the
record and queue it for the log thread) for AccessLog.write against the stdlib `logger.info(...,
extra=)` path, and the log thread's cost to render the line as text and as JSON. The log thread is
stopped while the caller is timed, so its writing does not take the GIL from the caller.
Then the same with `[log] access_file`: the caller's cost (the line's fields appended to a buffer)
and the writer's, CPU time of the whole process per line rendered and written in batches.

Usage: python benchmarks/access_log_bench.py [--n 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb_system.config import LogConfig  # noqa: E402
from lb_system.observability.access_log import AccessLog  # noqa: E402
from lb_system.observability.log import FIELDS, LOGGER_NAME, JsonFormatter, TextFormatter, configure_logging  # noqa: E402

LINE = {
    "method": "GET",
    "path": "/tasks/1",
    "status": 200,
    "backend": "backend-1",
    "duration_ms": 1.57,
    "request_id": "76593a8d67a2270e",
    "tries": "backend-1:200",
}


def best_us(run: Callable[[], object], n: int, rounds: int, between: Callable[[], object] = lambda: None) -> float:
    """The best round's µs per call."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            run()
        best = min(best, time.perf_counter() - started)
        between()
    return best / n * 1e6


def drain(q: Any) -> None:
    while not q.empty():
        q.get_nowait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        listener = configure_logging(LogConfig(file=str(Path(folder) / "balancer.log")), console=False)
        logger = logging.getLogger(LOGGER_NAME)
        access = AccessLog(logger)
        listener.stop()  # records now wait in its queue: only the caller's side is timed
        empty = functools.partial(drain, listener.queue)
        fast = best_us(lambda: access.write(**LINE), args.n, args.rounds, empty)  # type: ignore[arg-type]
        stdlib = best_us(lambda: logger.info("access", extra={FIELDS: dict(LINE)}), args.n, args.rounds, empty)
        for handler in listener.handlers:
            handler.close()
        own_caller, own_writer = access_file_costs(Path(folder), args.n, args.rounds)
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, "", 0, "access", None, None)
    record.__dict__[FIELDS] = LINE
    text, json_ = TextFormatter(), JsonFormatter()
    print(f"caller, AccessLog.write:                {fast:6.2f} µs/line")
    print(f"caller, logger.info('access', extra=):  {stdlib:6.2f} µs/line")
    print(f"log thread, text line:                  {best_us(lambda: text.format(record), args.n, args.rounds):6.2f} µs/line")
    print(f"log thread, JSON line:                  {best_us(lambda: json_.format(record), args.n, args.rounds):6.2f} µs/line")
    print(f"access_file, caller (buffer append):    {own_caller:6.2f} µs/line")
    print(f"access_file, writer (render + write):   {own_writer:6.2f} µs/line (CPU)")


def access_file_costs(folder: Path, n: int, rounds: int) -> tuple[float, float]:
    """(caller µs/line, writer CPU µs/line) with `[log] access_file`: the writer is held back while
    the caller is timed, then one batch of n lines is written at stop."""
    caller, writer = float("inf"), float("inf")
    for round_ in range(rounds):
        config = LogConfig(file=str(folder / f"b{round_}.log"), access_file=str(folder / f"a{round_}.log"))
        # The writer's first wake-up is at stop: it writes everything in one batch then.
        listener = configure_logging(config, console=False, access_interval=3600)
        access = AccessLog(logging.getLogger(LOGGER_NAME))
        caller = min(caller, best_us(functools.partial(access.write, **LINE), n, 1))  # type: ignore[arg-type]
        started = time.process_time()
        listener.stop()
        writer = min(writer, (time.process_time() - started) / n * 1e6)
        for handler in listener.handlers:
            handler.close()
    return caller, writer


if __name__ == "__main__":
    main()
