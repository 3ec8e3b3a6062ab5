"""What the system tells about itself: error tracking, request statistics, Prometheus metrics,
the /status document, the live dashboard feed, and balancer.log."""

from __future__ import annotations

from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.live import LiveFeed
from lb_system.observability.metrics import Metrics
from lb_system.observability.request_stats import RequestStats

__all__ = ["ErrorTracker", "LiveFeed", "Metrics", "RequestStats"]
