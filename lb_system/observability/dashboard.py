"""The live dashboard: the page at `GET /`, and the snapshot its event stream carries."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from lb_system.balancing.pool import BackendPool
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.request_stats import RATE_HISTORY_S, RequestStats
from lb_system.observability.status import backend_statuses
from lb_system.timestamps import iso_utc

RECENT_ERRORS_SHOWN = 20
_ERROR_FIELDS = ("total_errors", "error_types", "by_server", "by_method", "windows", "top_paths", "recent_errors", "since")


def dashboard_page() -> bytes:
    """The page, read from the package: one file, no CDN, works offline."""
    return resources.files(__package__).joinpath("static", "dashboard.html").read_bytes()


def make_page_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    page = dashboard_page()

    async def page_handler(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})

    return page_handler


def dashboard_snapshot(pool: BackendPool, stats: RequestStats, tracker: ErrorTracker) -> dict[str, object]:
    """Everything the page shows, in one JSON-able document."""
    now = pool.clock()
    errors = tracker.stats(limit=RECENT_ERRORS_SHOWN)
    return {
        "now": iso_utc(now),
        "health": {"status": pool.health_word(), "healthy": pool.healthy_count, "total": len(pool.backends)},
        "backends": backend_statuses(pool, stats),
        "errors": {key: errors[key] for key in _ERROR_FIELDS},
        # Per-second counts, oldest first; the last entry is the second that ends at `end`.
        "rates": {
            "end": math.floor(now),
            "seconds": RATE_HISTORY_S,
            "requests": stats.requests.series(now),
            "errors": tracker.per_second(RATE_HISTORY_S),
        },
    }
