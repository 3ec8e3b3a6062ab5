"""lb_system: a load balancer with built-in fault detection, on aiohttp, in one asyncio process."""

from lb_system.balancing.pool import Backend, BackendPool
from lb_system.config import Config, ConfigError, load_config, parse_config
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.operations.serving import StartupError
from lb_system.operations.system import System
from lb_system.proxy.balancer import make_balancer_app
from lb_system.proxy.health import HealthChecker
from lb_system.tasks.api import make_backend_app
from lb_system.tasks.sqlite_store import SqliteTaskStore
from lb_system.tasks.store import TaskStore, make_task_store

__all__ = [
    "Backend",
    "BackendPool",
    "Config",
    "ConfigError",
    "ErrorTracker",
    "HealthChecker",
    "StartupError",
    "System",
    "SqliteTaskStore",
    "TaskStore",
    "load_config",
    "make_backend_app",
    "make_balancer_app",
    "make_task_store",
    "parse_config",
]
__version__ = "0.1.0"
