"""Typed keys for state shared through aiohttp applications, requests and responses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .admin import AdminControl
    from .backend_pool import BackendPool
    from .error_tracker import ErrorTracker
    from .health import HealthChecker
    from .live import LiveFeed
    from .metrics import Metrics
    from .proxy import Forwarder
    from .request_stats import RequestStats
    from .task_store import TaskStore

ERROR_TRACKER = web.AppKey("error_tracker", "ErrorTracker")
TASK_STORE = web.AppKey("task_store", "TaskStore")
SERVER_NAME = web.AppKey("server_name", str)
BACKEND_POOL = web.AppKey("backend_pool", "BackendPool")
HEALTH_CHECKER = web.AppKey("health_checker", "HealthChecker")
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", "Forwarder")
METRICS = web.AppKey("metrics", "Metrics")
REQUEST_STATS = web.AppKey("request_stats", "RequestStats")
LIVE_FEED = web.AppKey("live_feed", "LiveFeed")
# What the admin API drives (the System); absent when the balancer runs without one.
ADMIN_CONTROL = web.AppKey("admin_control", "AdminControl")

REQUEST_ID = web.RequestKey("request_id", str)
# The problem detail rides on the response so the middleware records it without re-parsing JSON.
PROBLEM_DETAIL = web.ResponseKey("problem_detail", str)
# Set by the proxy on a backend's error answer: whose error it is, and whether a hosted
# backend (sharing our tracker) already recorded it, so each failure is counted once.
ERROR_SERVER = web.ResponseKey("error_server", str)
UPSTREAM_RECORDED = web.ResponseKey("upstream_recorded", bool)
