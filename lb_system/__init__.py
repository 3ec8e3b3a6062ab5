"""lb_system: a load balancer with built-in fault detection, on aiohttp, in one asyncio process."""

from .backend_pool import Backend, BackendPool
from .balancer import make_balancer_app
from .config import Config, ConfigError, load_config, parse_config
from .error_tracker import ErrorTracker
from .health import HealthChecker
from .system import StartupError, System
from .task_api import make_backend_app
from .task_store import TaskStore

__all__ = [
    "Backend",
    "BackendPool",
    "Config",
    "ConfigError",
    "ErrorTracker",
    "HealthChecker",
    "StartupError",
    "System",
    "TaskStore",
    "load_config",
    "make_backend_app",
    "make_balancer_app",
    "parse_config",
]
__version__ = "0.1.0"
