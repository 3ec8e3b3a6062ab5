"""Each balancer feature's cost per proxied request, in isolation: µs per call of the very
objects a running System uses (its forwarder's header policy, target checks, observers, access
line and the problem middleware), on one parsed `GET /tasks/1`, best of --rounds.

The features' real cost is this plus what the profiler shows around them (benchmarks/run.py's
CPU column is the whole hop). The log thread is held back while the access line is timed.

Usage: python benchmarks/features_bench.py [--n 20000] [--rounds 5]
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from access_log_bench import best_us, drain, sizes  # noqa: E402 - beside this script

from lb_system import System, parse_config  # noqa: E402
from lb_system.balancing.events import ProxiedRequest, TryResult, render_tries  # noqa: E402
from lb_system.observability.log import LOGGER_NAME, configure_logging  # noqa: E402
from lb_system.problems import REQUEST_ID_HEADER, request_id_from  # noqa: E402
from lb_system.proxy.targets import upstream_target  # noqa: E402

# What wrk sends.
HEADERS = {"Host": "127.0.0.1:8080"}


def run_through(make: Callable[[], Coroutine[Any, Any, object]]) -> Callable[[], None]:
    """A coroutine that never suspends, run to its end without an event loop's turn."""

    def step() -> None:
        try:
            make().send(None)
        except StopIteration:
            pass

    return step


def a_request() -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: ("127.0.0.1", 40000) if name == "peername" else default
    return make_mocked_request("GET", "/tasks/1", headers=HEADERS, transport=transport)


async def measure(n: int, rounds: int, folder: Path) -> list[tuple[str, float]]:
    config = parse_config(
        {
            "balancer": {"port": 0},
            "database": {"path": "tasks.db"},
            "log": {"file": "balancer.log"},
            "backends": [{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}],
        },
        base_dir=folder,
    )
    listener = configure_logging(config.log, console=False)
    system = System(config, logger=logging.getLogger(LOGGER_NAME))
    await system.start()
    try:
        assert system.balancer is not None
        forwarder = system.balancer.forwarder
        own_paths = forwarder.own_paths
        assert own_paths is not None
        problems = system.balancer.forwarder.problems
        request = a_request()
        request_id = request_id_from(None)
        answer = web.Response(body=b"{}", content_type="application/json")

        async def handler(request: web.Request) -> web.StreamResponse:
            return answer

        tries = [TryResult("backend-1", 200, 0.0004)]
        started = time.perf_counter()
        listener.stop()  # access lines wait in the queue while timed; emptied between rounds
        empty = functools.partial(drain, listener.queue)  # type: ignore[attr-defined]

        def access_line() -> None:
            forwarder.access_log.write(
                method=request.method,
                path=request.path,
                status=200,
                backend="backend-1",
                duration_ms=(time.perf_counter() - started) * 1000,
                request_id=request_id,
                tries=render_tries(tries),
            )

        def targets() -> None:
            target, _ = upstream_target(request)
            own_paths.routed_elsewhere(request.rel_url.path_safe)
            own_paths.refuse(request, target)

        def observers() -> None:
            forwarder.observers.on_request(
                ProxiedRequest("GET", 200, "backend-1", time.perf_counter() - started, tuple(tries), False, None)
            )

        async def answered(request: web.Request, request_id: str) -> web.StreamResponse:
            return answer

        # Forwarder.serve itself, its handler answering at once: the problem middleware's steps as proxied requests take them.
        forwarder._handle = answered  # type: ignore[method-assign]
        serve_through = run_through(lambda: forwarder.serve(request))
        limits = await client_limits_cost(system, n, rounds)
        return [
            limits,
            (
                "request id (X-Request-ID read or made)",
                best_us(lambda: request_id_from(request.headers.get(REQUEST_ID_HEADER)), n, rounds),
            ),
            (
                "X-Forwarded-*, Via, X-Request-ID (backend's header lines)",
                best_us(lambda: forwarder.header_policy.upstream_head_fields(request, request_id), n, rounds),
            ),
            ("target checks (origin-form, own paths)", best_us(targets, n, rounds)),
            ("problem steps on a proxied 200 (Forwarder.serve around its handler)", best_us(serve_through, n, rounds)),
            ("problem middleware on an own endpoint's 200", best_us(run_through(lambda: problems(request, handler)), n, rounds)),
            ("metrics, request stats, error windows (observers)", best_us(observers, n, rounds)),
            ("access line, on the event loop", best_us(access_line, n, rounds, empty)),
        ]
    finally:
        await system.stop()
        for handler_ in listener.handlers:
            handler_.close()


REQUEST = b"GET /tasks/1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


async def client_limits_cost(system: System, n: int, rounds: int) -> tuple[str, float]:
    """The balancer's client connection receiving a request against aiohttp's own, same bytes."""
    assert system.balancer_runner is not None and system.balancer_runner.server is not None

    async def per_request(server: web.Server) -> float:
        connection = server()
        transport = mock.Mock()
        transport.get_extra_info.return_value = None
        connection.connection_made(transport)
        # Its request loop is stopped: only the parsing and the limits are timed.
        assert connection._task_handler is not None
        connection._task_handler.cancel()
        await asyncio.sleep(0)
        messages = connection._messages  # parsed requests pile up here: this loop never yields to the handler

        def receive() -> None:
            connection.data_received(REQUEST)
            messages.clear()

        try:
            return best_us(receive, n, rounds)
        finally:
            connection.connection_lost(None)

    ours = await per_request(system.balancer_runner.server)
    aiohttp_own = await per_request(web.Server(lambda request: web.Response()))  # type: ignore[arg-type, return-value]
    return ("client limits (ClientConnection over aiohttp's RequestHandler)", ours - aiohttp_own)


def main() -> None:
    args = sizes(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        rows = asyncio.run(measure(args.n, args.rounds, Path(folder)))
    for name, us in rows:
        print(f"{us:6.2f} µs  {name}")
    # A proxied request pays every row but the own endpoints' middleware.
    print(f"{sum(us for name, us in rows if 'own endpoint' not in name):6.2f} µs  together, on a proxied request")


if __name__ == "__main__":
    main()
