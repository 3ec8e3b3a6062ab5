"""Running the whole system: start and stop, serving sockets, membership changes (live reloads of
config.toml and admin actions) and the config file watcher."""

from __future__ import annotations

from lb_system.operations.membership import Membership
from lb_system.operations.serving import StartupError
from lb_system.operations.system import System

__all__ = ["Membership", "StartupError", "System"]
