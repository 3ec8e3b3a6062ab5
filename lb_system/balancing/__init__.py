"""Pure balancing policy: the backend pool and its health state machine, the strategies, retries
and their budget, and the events observers consume. Nothing here opens a socket or imports aiohttp."""

from __future__ import annotations

from lb_system.balancing.events import BALANCER, CheckResult, Observer, Observers, ProxiedRequest, Transition, TryResult
from lb_system.balancing.pool import Backend, BackendPool
from lb_system.balancing.pools import Pools
from lb_system.balancing.retry import RetryBudget, RetryPolicy
from lb_system.balancing.routes import Route, RouteTable
from lb_system.balancing.strategies import Strategy, make_strategy

__all__ = [
    "BALANCER",
    "Backend",
    "BackendPool",
    "CheckResult",
    "Observer",
    "Observers",
    "Pools",
    "ProxiedRequest",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "RouteTable",
    "Strategy",
    "Transition",
    "TryResult",
    "make_strategy",
]
