"""Micro-benchmark of one access line, text format: µs per line in the caller (the event loop's
cost) for the stdlib `logger.info(..., extra=)` and for AccessLog.write, to balancer.log (its time
and fields queued for the log thread) and with `[log] access_file` (appended to that file's
buffer); and the writing thread's CPU per line (rendered and written in one batch). The writer is
held back while the caller is timed, so it does not take the GIL from the caller. With the
console too (`python run.py`'s setup), run it with `2>/dev/null`.

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
from lb_system.observability.log import FIELDS, LOGGER_NAME, configure_logging  # noqa: E402

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


def sizes(doc: str) -> argparse.Namespace:
    """--n calls a round, --rounds rounds (the best one counts)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = sizes(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        listener = configure_logging(LogConfig(file=str(Path(folder) / "balancer.log")), console=False)
        logger = logging.getLogger(LOGGER_NAME)
        listener.stop()  # records now wait in its queue: only the caller's side is timed
        empty = functools.partial(drain, listener.queue)
        stdlib = best_us(lambda: logger.info("access", extra={FIELDS: dict(LINE)}), args.n, args.rounds, empty)
        for handler in listener.handlers:
            handler.close()
        shared = costs(Path(folder), "shared", args.n, args.rounds, access_file=False)
        own = costs(Path(folder), "own", args.n, args.rounds, access_file=True)
        both = costs(Path(folder), "both", args.n, args.rounds, access_file=False, console=True)
    print(f"caller, logger.info('access', extra=):     {stdlib:6.2f} µs/line")
    print(f"balancer.log, caller (AccessLog.write):   {shared[0]:6.2f} µs/line")
    print(f"balancer.log, log thread (render + write): {shared[1]:6.2f} µs/line (CPU)")
    print(f"... and the console, log thread:           {both[1]:6.2f} µs/line (CPU)")
    print(f"access_file, caller (AccessLog.write):    {own[0]:6.2f} µs/line")
    print(f"access_file, writer (render + write):     {own[1]:6.2f} µs/line (CPU)")


def costs(folder: Path, name: str, n: int, rounds: int, *, access_file: bool, console: bool = False) -> tuple[float, float]:
    """(caller µs/line, writer CPU µs/line): the writer is held back while the caller is timed,
    then writes the n lines in one go; best of `rounds`."""
    caller, writer = float("inf"), float("inf")
    for round_ in range(rounds):
        config = LogConfig(
            file=str(folder / f"{name}{round_}.log"),
            access_file=str(folder / f"{name}{round_}-access.log") if access_file else None,
        )
        # The access file's writer wakes up first at stop; the queue's listener is stopped at once.
        listener = configure_logging(config, console=console, access_interval=3600)
        if not access_file:
            listener.stop()
        access = AccessLog(logging.getLogger(LOGGER_NAME))
        caller = min(caller, best_us(functools.partial(access.write, **LINE), n, 1))  # type: ignore[arg-type]
        started = time.process_time()
        if not access_file:
            listener.start()
        listener.stop()
        writer = min(writer, (time.process_time() - started) / n * 1e6)
        for handler in listener.handlers:
            handler.close()
    return caller, writer


if __name__ == "__main__":
    main()
