"""The SQLite task table, reached only through aiosqlite so the event loop never blocks."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from lb_system.tasks.store import SCHEMA_VERSION, SchemaTooNew, StoreUnavailable, Task, check_fields
from lb_system.timestamps import iso_datetime, utc_now_ms

_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT    NOT NULL
)
"""
_TASKS_TABLE = """
CREATE TABLE IF NOT EXISTS tasks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       TEXT    NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    done        INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
)
"""
_COLUMNS = "id, title, description, done, created_at, updated_at"
_SELECT_ONE = f"SELECT {_COLUMNS} FROM tasks WHERE id = ?"


def _row_to_task(row: Any) -> Task:
    return {
        "id": row[0],
        "title": row[1],
        "description": row[2],
        "done": bool(row[3]),
        "created_at": row[4],
        "updated_at": row[5],
    }


class SqliteTaskStore:
    """Tasks in one SQLite file, shared by every hosted backend of one process.

    One aiosqlite connection (one worker thread) in autocommit mode; each write is a
    single statement, so no transaction can interleave with another coroutine's. Every query
    is one `execute_fetchall`: one hop to the worker thread and back, not one per cursor call.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreUnavailable(str(error)) from None
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await self._migrate(db)
        except sqlite3.Error as error:
            await db.close()
            raise StoreUnavailable(str(error)) from None
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Create what is absent and record the version, in one transaction; refuse a newer schema.
        A file from before versioning has today's tasks table: it is version 1."""
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(_SCHEMA_VERSION_TABLE)
            ((found,),) = await db.execute_fetchall("SELECT MAX(version) FROM schema_version")
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaTooNew(self.where, found)
            await db.execute(_TASKS_TABLE)
            if found is None:
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (SCHEMA_VERSION, iso_datetime(utc_now_ms()))
                )
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        if self._db is None:
            raise StoreUnavailable("the task store is not open")
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except sqlite3.OperationalError as error:  # locked past busy_timeout, disk full, file gone
            raise StoreUnavailable(f"database {self.where}: {error}") from None

    async def ping(self, timeout: float = 1.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._fetch("SELECT 1")
            return True
        except Exception:
            return False

    async def create(self, title: str, description: str = "", done: bool = False) -> Task:
        now = iso_datetime(utc_now_ms())
        (row,) = await self._fetch(
            f"INSERT INTO tasks (title, description, done, created_at, updated_at) VALUES (?, ?, ?, ?, ?) RETURNING {_COLUMNS}",
            (title, description, int(done), now, now),
        )
        return _row_to_task(row)

    async def get(self, task_id: int) -> Task | None:
        rows = await self._fetch(_SELECT_ONE, (task_id,))
        return _row_to_task(rows[0]) if rows else None

    async def list(self, *, done: bool | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Task], int]:
        where, params = ("WHERE done = ?", (int(done),)) if done is not None else ("", ())
        rows = await self._fetch(
            f"SELECT {_COLUMNS}, COUNT(*) OVER () FROM tasks {where} ORDER BY id LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        if rows:
            return [_row_to_task(row) for row in rows], rows[0][6]
        ((total,),) = await self._fetch(f"SELECT COUNT(*) FROM tasks {where}", params)
        return [], total

    async def update(self, task_id: int, changes: dict[str, Any]) -> Task | None:
        check_fields(changes)
        assignments = [f"{field} = ?" for field in changes]
        values = [int(v) if field == "done" else v for field, v in changes.items()]
        rows = await self._fetch(
            f"UPDATE tasks SET {', '.join([*assignments, 'updated_at = ?'])} WHERE id = ? RETURNING {_COLUMNS}",
            (*values, iso_datetime(utc_now_ms()), task_id),
        )
        return _row_to_task(rows[0]) if rows else None

    async def delete(self, task_id: int) -> bool:
        return bool(await self._fetch("DELETE FROM tasks WHERE id = ? RETURNING id", (task_id,)))
