"""The task REST API a backend serves, and the SQLite task table behind it."""

from __future__ import annotations

from lb_system.tasks.api import make_backend_app
from lb_system.tasks.store import TaskStore

__all__ = ["TaskStore", "make_backend_app"]
