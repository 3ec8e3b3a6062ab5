"""Running the whole system: start and stop, serving sockets, live reloads of config.toml."""

from __future__ import annotations

from lb_system.operations.serving import StartupError
from lb_system.operations.system import System

__all__ = ["StartupError", "System"]
