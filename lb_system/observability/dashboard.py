"""The live dashboard: the page at `GET /`, and the snapshot its event stream carries."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from lb_system.balancing.pools import Pools
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.request_stats import ERROR_RATE_WINDOW_S, LATENCY_SAMPLES, RATE_HISTORY_S, RequestStats
from lb_system.observability.status import backend_statuses, pool_statuses
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


def _no_config_error() -> str | None:
    return None


def dashboard_snapshot(
    pools: Pools,
    stats: RequestStats,
    tracker: ErrorTracker,
    config_error: Callable[[], str | None] = _no_config_error,
) -> dict[str, object]:
    """Everything the page shows, in one JSON-able document. `config_error` tells the refused
    edit of the config file, if any (the System knows it; observability does not import it)."""
    now = pools.clock()
    errors = tracker.stats(limit=RECENT_ERRORS_SHOWN)
    return {
        "now": iso_utc(now),
        "health": {
            "status": pools.health_word(),
            "healthy": pools.healthy_count,
            "serving": pools.serving_count,
            "total": len(pools.backends),
        },
        "config_error": config_error(),
        "backends": backend_statuses(pools, stats),
        # Each pool's health word; the page groups the backends by pool when there is more than one.
        "pools": pool_statuses(pools),
        # Removed by a reload, finishing their in-flight requests.
        "retiring": backend_statuses(pools, stats, retiring=True),
        # The windows behind the figures, so the page's captions say what the numbers cover.
        "windows": {
            "latency_samples": LATENCY_SAMPLES,
            "error_rate_s": ERROR_RATE_WINDOW_S,
            "rates_s": RATE_HISTORY_S,
            "recent_errors": RECENT_ERRORS_SHOWN,
        },
        "errors": {key: errors[key] for key in _ERROR_FIELDS},
        # Per-second counts, oldest first; the last entry is the second that ends at `end`.
        "rates": {
            "end": math.floor(now),
            "seconds": RATE_HISTORY_S,
            "requests": stats.requests.series(now),
            "errors": tracker.per_second(RATE_HISTORY_S),
        },
    }
