"""The task store: one interface, two databases. SQLite (`[database] path`, the default) and
PostgreSQL (`[database] url`) answer the same, down to ids, timestamps and order."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from lb_system.config import DatabaseConfig

# The schema this code reads and writes. Each store records it in a `schema_version` table and
# refuses a database at a newer version (written by a newer lb_system) instead of guessing.
SCHEMA_VERSION = 1
FIELDS = ("title", "description", "done")
Task = dict[str, Any]


class StoreUnavailable(Exception):
    """The database does not answer (down, unreachable, out of connections): a 503, not a 500."""


class SchemaTooNew(Exception):
    """The database's schema is newer than this code knows: start-up stops."""

    def __init__(self, where: str, found: int) -> None:
        super().__init__(
            f"database {where} is at schema version {found}, newer than this lb_system knows ({SCHEMA_VERSION}): "
            "upgrade lb_system, or point it at another database"
        )
        self.found = found


class TaskStore(Protocol):
    """Where the hosted backends keep tasks. Every method but `ping` may raise StoreUnavailable."""

    @property
    def where(self) -> str:
        """The database as a log line may name it (never with a password)."""

    async def open(self) -> None:
        """Connect, create the schema if absent; SchemaTooNew or StoreUnavailable otherwise."""

    async def close(self) -> None: ...

    async def ping(self, timeout: float = 1.0) -> bool:
        """True when the database answers a trivial query in time."""

    async def create(self, title: str, description: str = "", done: bool = False) -> Task: ...

    async def get(self, task_id: int) -> Task | None: ...

    async def list(self, *, done: bool | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Task], int]:
        """One page in id order, and the number of tasks matching `done`."""

    async def update(self, task_id: int, changes: dict[str, Any]) -> Task | None:
        """Apply the given fields (a subset of FIELDS) atomically; None when the task does not exist."""

    async def delete(self, task_id: int) -> bool: ...


def check_fields(changes: dict[str, Any]) -> None:
    if not changes.keys() <= set(FIELDS):
        raise ValueError(f"unknown task fields: {sorted(changes.keys() - set(FIELDS))}")


def make_task_store(database: DatabaseConfig, logger: logging.Logger | None = None) -> TaskStore:
    """The store `[database]` names; nothing is opened yet."""
    if database.url is None:
        from lb_system.tasks.sqlite_store import SqliteTaskStore

        return SqliteTaskStore(database.path)
    # Imported here: asyncpg is an optional extra, needed only with a url.
    from lb_system.tasks.postgres_store import PostgresTaskStore

    return PostgresTaskStore(
        database.url, password_env=database.password_env, pool_min=database.pool_min, pool_max=database.pool_max, logger=logger
    )
