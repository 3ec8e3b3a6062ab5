"""The task REST API a backend serves, and the task store behind it (SQLite or PostgreSQL)."""

from __future__ import annotations

from lb_system.tasks.api import make_backend_app
from lb_system.tasks.sqlite_store import SqliteTaskStore
from lb_system.tasks.store import SchemaTooNew, StoreUnavailable, TaskStore, make_task_store

__all__ = ["SchemaTooNew", "SqliteTaskStore", "StoreUnavailable", "TaskStore", "make_backend_app", "make_task_store"]
