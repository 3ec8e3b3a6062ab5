"""The `/status` document: the pools' state, with each backend's latency and error rate."""

from __future__ import annotations

import asyncio
import os
import socket

from lb_system.balancing.pools import Pools
from lb_system.observability.request_stats import RequestStats


def backend_statuses(pools: Pools, stats: RequestStats, *, retiring: bool = False) -> list[dict[str, object]]:
    now = pools.clock()
    if retiring:
        # Removed from the pool: finishing in-flight requests, never chosen for a new one.
        return [b.status_dict(now) | {"pool": b.pool, "serving": False} | stats.backend_fields(b.name) for b in pools.retiring]
    return [b.status_dict(now) | {"pool": b.pool} | stats.backend_fields(b.name) for b in pools.backends]


def pool_statuses(pools: Pools) -> list[dict[str, object]]:
    """Each configured pool: its health word (as /health's over its own backends), strategy and members."""
    return [
        {
            "name": pool.name,
            "status": pool.health_word(),
            "strategy": pool.strategy.name,
            "serving": pool.serving_count,
            "healthy": pool.healthy_count,
            "total": len(pool.backends),
            "backends": [b.name for b in pool.backends],
        }
        for pool in pools
    ]


def loop_name() -> str:
    """Which event loop runs this process: "uvloop" or "asyncio"."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def instance_identity() -> dict[str, object]:
    """Which instance answers: its host name and process id (several balancer processes may share a port)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def status_document(pools: Pools, stats: RequestStats, *, config_error: str | None = None) -> dict[str, object]:
    return {
        "strategy": pools.default.strategy.name,
        "healthy": pools.healthy_count,
        "total": len(pools.backends),
        "backends": backend_statuses(pools, stats),
        "pools": pool_statuses(pools),
        # Removed by a reload, finishing their in-flight requests.
        "retiring": backend_statuses(pools, stats, retiring=True),
        "config_error": config_error,
        "loop": loop_name(),
        "instance": instance_identity(),
    }
