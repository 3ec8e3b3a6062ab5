"""A small HTTP/1.1 keep-alive load generator on asyncio, for when wrk is not installed, and for
the fixed-rate part of the benchmark (wrk2 is rarely packaged).

Usage: python benchmarks/loadgen.py URL [-c 32] [-d 10] [--rate R] [--warmup S]

Closed loop (default): each of `-c` connections sends its next request as soon as the previous
answer is in. Fixed rate (`--rate`): requests are due on a fixed schedule whatever the server
does; a request that finds no idle connection waits, and its latency counts from when it was
due, so a server stall is not hidden (no coordinated omission). Prints one JSON object: requests,
seconds, rps, latency percentiles in ms, errors. It speaks just enough HTTP for GET with a
Content-Length answer; anything else counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

# Not loop.time(): uvloop's clock ticks in whole milliseconds.
clock = time.perf_counter


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; calls `on_answer(ok)` after each complete response."""

    def __init__(
        self,
        request: bytes,
        on_answer: Callable[[_Connection, bool], None],
        on_lost: Callable[[_Connection], None],
    ) -> None:
        self.request = request
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = -1  # -1: still reading the head
        self.status_ok = False
        self.sent_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, sent_at: float) -> None:
        self.sent_at = sent_at
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.body_left < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).decode("latin-1")
                del self.buffer[: end + 4]
                lines = head.split("\r\n")
                parts = lines[0].split(" ", 2)
                self.status_ok = len(parts) >= 2 and parts[1].startswith("2")
                length = None
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length is None:
                    self._fail()
                    return
                self.body_left = length
            if len(self.buffer) < self.body_left:
                return
            del self.buffer[: self.body_left]
            self.body_left = -1
            self.on_answer(self, self.status_ok)
            if not self.buffer:
                return

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.on_lost(self)
        if not self.closed.done():
            self.closed.set_result(None)


class LoadRun:
    """Latencies and errors of one measured window (answers before `measure_from` are warm-up)."""

    def __init__(self, measure_from: float, stop_at: float) -> None:
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.latencies: list[float] = []
        self.errors = 0
        self.non_2xx = 0
        self.running = True

    def record(self, due: float, now: float, ok: bool) -> None:
        if now < self.measure_from:
            return
        if ok:
            self.latencies.append(now - due)
        else:
            self.non_2xx += 1

    def result(self, connections: int, rate: float | None) -> dict[str, object]:
        values = sorted(self.latencies)
        seconds = self.stop_at - self.measure_from
        requests = len(values) + self.non_2xx
        return {
            "generator": "asyncio",
            "connections": connections,
            "rate": rate,
            "seconds": round(seconds, 3),
            "requests": requests,
            "rps": round(requests / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(percentile(values, 0.50) * 1000, 3),
            "p90_ms": round(percentile(values, 0.90) * 1000, 3),
            "p99_ms": round(percentile(values, 0.99) * 1000, 3),
            "max_ms": round((values[-1] if values else 0.0) * 1000, 3),
            "errors": self.errors + self.non_2xx,
            "non_2xx": self.non_2xx,
        }


async def _connect(host: str, port: int, request: bytes, on_answer, on_lost) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: _Connection(request, on_answer, on_lost), host, port)
    return protocol


def _request_bytes(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: lb-bench\r\n\r\n".encode()
    return host, port, request


async def closed_loop(url: str, connections: int, duration: float, warmup: float) -> dict[str, object]:
    """Each connection keeps exactly one request in flight."""
    host, port, request = _request_bytes(url)
    loop = asyncio.get_running_loop()
    start = clock()
    run = LoadRun(start + warmup, start + warmup + duration)
    done = loop.create_future()
    open_count = connections

    def finished_one() -> None:
        nonlocal open_count
        open_count -= 1
        if open_count == 0 and not done.done():
            done.set_result(None)

    def on_answer(connection: _Connection, ok: bool) -> None:
        now = clock()
        run.record(connection.sent_at, now, ok)
        if now < run.stop_at:
            connection.send(now)
        else:
            finished_one()

    def on_lost(connection: _Connection) -> None:
        run.errors += 1  # the request in flight never got its answer
        finished_one()

    pool = [await _connect(host, port, request, on_answer, on_lost) for _ in range(connections)]
    for connection in pool:
        connection.send(clock())
    try:
        await asyncio.wait_for(asyncio.shield(done), warmup + duration + 10)
    except TimeoutError:
        run.errors += open_count
    for connection in pool:
        connection.close()
    return run.result(connections, None)


async def fixed_rate(url: str, connections: int, duration: float, warmup: float, rate: float) -> dict[str, object]:
    """Requests due every 1/rate seconds, sent on any idle connection; late ones queue."""
    host, port, request = _request_bytes(url)
    asyncio.get_running_loop()
    idle: collections.deque[_Connection] = collections.deque()
    waiting: collections.deque[float] = collections.deque()  # due times of queued requests
    due_at: dict[_Connection, float] = {}
    in_flight = 0

    def on_answer(connection: _Connection, ok: bool) -> None:
        nonlocal in_flight
        in_flight -= 1
        run.record(due_at.pop(connection), clock(), ok)
        if waiting:
            dispatch(connection, waiting.popleft())
        else:
            idle.append(connection)

    def dispatch(connection: _Connection, due: float) -> None:
        nonlocal in_flight
        in_flight += 1
        due_at[connection] = due
        connection.send(due)

    def on_lost(connection: _Connection) -> None:
        nonlocal in_flight
        if connection in due_at:
            del due_at[connection]
            in_flight -= 1
            run.errors += 1
        if connection in idle:
            idle.remove(connection)

    idle.extend([await _connect(host, port, request, on_answer, on_lost) for _ in range(connections)])
    pool = list(idle)
    interval = 1.0 / rate
    due = clock()
    end = due + warmup + duration
    run = LoadRun(due + warmup, end)
    while due < end:
        now = clock()
        if now < due:
            await asyncio.sleep(due - now)
        # Catch up on every request that fell due while the loop slept.
        now = clock()
        while due <= now and due < end:
            if idle:
                # Timed from the actual send: the generator's own timer lateness is not the server's.
                dispatch(idle.popleft(), now)
            else:
                waiting.append(due)
            due += interval
    deadline = clock() + 10
    while (in_flight or waiting) and clock() < deadline:
        await asyncio.sleep(0.01)
    run.errors += in_flight + len(waiting)
    for connection in pool:
        connection.close()
    return run.result(connections, rate)


def new_event_loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load generator (closed loop or fixed rate)")
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--rate", type=float, help="fixed request rate (requests/s) instead of a closed loop")
    args = parser.parse_args(argv)
    if args.rate:
        work = fixed_rate(args.url, args.connections, args.duration, args.warmup, args.rate)
    else:
        work = closed_loop(args.url, args.connections, args.duration, args.warmup)
    try:
        with asyncio.Runner(loop_factory=new_event_loop_factory()) as runner:
            result = runner.run(work)
    except OSError as error:
        print(f"loadgen: cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    result["loop"] = "uvloop" if new_event_loop_factory() else "asyncio"
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
