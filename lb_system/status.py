"""The `/status` document: the pool's state, with each backend's latency and error rate."""

from __future__ import annotations

from .backend_pool import BackendPool
from .request_stats import RequestStats


def backend_statuses(pool: BackendPool, stats: RequestStats) -> list[dict[str, object]]:
    now = pool.clock()
    return [backend.status_dict(now) | stats.backend_fields(backend.name) for backend in pool.backends]


def status_document(pool: BackendPool, stats: RequestStats) -> dict[str, object]:
    return {
        "strategy": pool.strategy.name,
        "healthy": pool.healthy_count,
        "total": len(pool.backends),
        "backends": backend_statuses(pool, stats),
    }
