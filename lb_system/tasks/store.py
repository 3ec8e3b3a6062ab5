"""The SQLite task table, reached only through aiosqlite so the event loop never blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosqlite

from lb_system.timestamps import utc_now_iso

_SCHEMA = """
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
FIELDS = ("title", "description", "done")


def _row_to_task(row: Any) -> dict[str, Any]:
    return {
        "id": row[0],
        "title": row[1],
        "description": row[2],
        "done": bool(row[3]),
        "created_at": row[4],
        "updated_at": row[5],
    }


class TaskStore:
    """Tasks in one SQLite file, shared by every hosted backend.

    One aiosqlite connection (one worker thread) in autocommit mode; each write is a
    single statement, so no transaction can interleave with another coroutine's. Every query
    is one `execute_fetchall`: one hop to the worker thread and back, not one per cursor call.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("task store is not open")
        return self._db

    async def ping(self, timeout: float = 1.0) -> bool:
        """True when the database answers a trivial query in time."""
        if self._db is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._db.execute_fetchall("SELECT 1")
            return True
        except Exception:
            return False

    async def create(self, title: str, description: str = "", done: bool = False) -> dict[str, Any]:
        now = utc_now_iso()
        (row,) = await self.db.execute_fetchall(
            f"INSERT INTO tasks (title, description, done, created_at, updated_at) VALUES (?, ?, ?, ?, ?) RETURNING {_COLUMNS}",
            (title, description, int(done), now, now),
        )
        return _row_to_task(row)

    async def get(self, task_id: int) -> dict[str, Any] | None:
        rows = list(await self.db.execute_fetchall(_SELECT_ONE, (task_id,)))
        return _row_to_task(rows[0]) if rows else None

    async def list(self, *, done: bool | None = None, limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        where, params = ("WHERE done = ?", (int(done),)) if done is not None else ("", ())
        rows = list(
            await self.db.execute_fetchall(
                f"SELECT {_COLUMNS}, COUNT(*) OVER () FROM tasks {where} ORDER BY id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
        )
        if rows:
            return [_row_to_task(row) for row in rows], rows[0][6]
        ((total,),) = await self.db.execute_fetchall(f"SELECT COUNT(*) FROM tasks {where}", params)
        return [], total

    async def update(self, task_id: int, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply the given fields (a subset of FIELDS) atomically; None when the task does not exist."""
        if not changes.keys() <= set(FIELDS):
            raise ValueError(f"unknown task fields: {sorted(changes.keys() - set(FIELDS))}")
        assignments = [f"{field} = ?" for field in changes]
        values = [int(v) if field == "done" else v for field, v in changes.items()]
        rows = list(
            await self.db.execute_fetchall(
                f"UPDATE tasks SET {', '.join([*assignments, 'updated_at = ?'])} WHERE id = ? RETURNING {_COLUMNS}",
                (*values, utc_now_iso(), task_id),
            )
        )
        return _row_to_task(rows[0]) if rows else None

    async def delete(self, task_id: int) -> bool:
        rows = await self.db.execute_fetchall("DELETE FROM tasks WHERE id = ? RETURNING id", (task_id,))
        return bool(rows)
