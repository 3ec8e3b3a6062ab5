"""The `/status` document: the pool's state, with each backend's latency and error rate."""

from __future__ import annotations

import asyncio
import os
import socket

from lb_system.balancing.pool import BackendPool
from lb_system.observability.request_stats import RequestStats


def backend_statuses(pool: BackendPool, stats: RequestStats, *, retiring: bool = False) -> list[dict[str, object]]:
    now = pool.clock()
    if retiring:
        # Removed from the pool: finishing in-flight requests, never chosen for a new one.
        return [b.status_dict(now) | {"serving": False} | stats.backend_fields(b.name) for b in pool.retiring]
    return [b.status_dict(now) | stats.backend_fields(b.name) for b in pool.backends]


def loop_name() -> str:
    """Which event loop runs this process: "uvloop" or "asyncio"."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def instance_identity() -> dict[str, object]:
    """Which instance answers: its host name and process id (several balancer processes may share a port)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def status_document(pool: BackendPool, stats: RequestStats, *, config_error: str | None = None) -> dict[str, object]:
    return {
        "strategy": pool.strategy.name,
        "healthy": pool.healthy_count,
        "total": len(pool.backends),
        "backends": backend_statuses(pool, stats),
        # Removed by a reload, finishing their in-flight requests.
        "retiring": backend_statuses(pool, stats, retiring=True),
        "config_error": config_error,
        "loop": loop_name(),
        "instance": instance_identity(),
    }
