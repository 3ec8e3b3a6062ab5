"""The balancer application: the forwarder that moves requests to backends, its transport, the
active health checks and the admin API."""

from __future__ import annotations

from lb_system.proxy.balancer import Balancer, make_balancer_app
from lb_system.proxy.forwarder import Forwarder
from lb_system.proxy.health import HealthChecker

__all__ = ["Balancer", "Forwarder", "HealthChecker", "make_balancer_app"]
