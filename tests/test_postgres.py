"""The task store on a real PostgreSQL (and, where it applies, SQLite too): the schema version,
a database that goes away and comes back, and a password that never shows."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.config_files import BASE_CONFIG
from support.logs import LogRecords
from support.postgres import TemporaryPostgres, reset_task_tables
from support.run_py import start_run_py, stop_run_py
from support.waiting import wait_for

from lb_system import Config, ConfigError, StartupError, System, parse_config
from lb_system.operations.reload_plan import plan_reload
from lb_system.tasks.store import SCHEMA_VERSION, SchemaTooNew, StoreUnavailable

PASSWORD = "lb-test-password"  # TemporaryPostgres's default


@pytest.fixture
def postgres(postgres_server: TemporaryPostgres) -> Iterator[TemporaryPostgres]:
    """The session's PostgreSQL, running and empty before and after the test."""
    reset_task_tables(postgres_server)
    yield postgres_server
    reset_task_tables(postgres_server)


def postgres_config(tmp_path: Path, database: dict[str, Any], **sections: Any) -> Config:
    data = {key: value for key, value in BASE_CONFIG.items() if key != "database"}
    return parse_config({**data, "database": database, **sections}, base_dir=tmp_path)


def schema_versions(make_store, tmp_path: Path, postgres_server_or_none) -> list[int]:
    if postgres_server_or_none is None:
        with sqlite3.connect(tmp_path / "tasks.db") as db:
            rows = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        db.close()
        return [row[0] for row in rows]
    return [int(v) for v in postgres_server_or_none.psql("SELECT version FROM schema_version ORDER BY version").split()]


@pytest.fixture
def server_of(request: pytest.FixtureRequest):
    """The PostgreSQL behind `make_store`'s parameter, or None for SQLite."""
    return request.getfixturevalue("postgres_server") if request.node.callspec.params["make_store"] == "postgres" else None


def record_version(server: TemporaryPostgres | None, tmp_path: Path, version: int) -> None:
    sql = f"INSERT INTO schema_version (version, applied_at) VALUES ({version}, '2030-01-01T00:00:00.000Z')"
    if server is None:
        with sqlite3.connect(tmp_path / "tasks.db") as db:
            db.execute(sql)
        db.close()
    else:
        server.psql(sql)


async def test_the_schema_and_its_version_are_made_once(make_store, tmp_path: Path, server_of) -> None:
    for _ in range(2):  # the second open finds everything in place and records nothing more
        store = make_store()
        await store.open()
        await store.create("kept")
        await store.close()
    assert schema_versions(make_store, tmp_path, server_of) == [SCHEMA_VERSION]
    store = make_store()
    await store.open()
    try:
        tasks, total = await store.list()
        assert total == 2 and [t["id"] for t in tasks] == [1, 2]
    finally:
        await store.close()


async def test_a_database_at_a_newer_schema_version_stops_start_up(make_store, tmp_path: Path, server_of) -> None:
    store = make_store()
    await store.open()
    await store.close()
    record_version(server_of, tmp_path, SCHEMA_VERSION + 1)
    newer = make_store()
    with pytest.raises(SchemaTooNew, match=f"at schema version {SCHEMA_VERSION + 1}, newer than this lb_system knows"):
        await newer.open()
    await newer.close()
    database = {"path": "tasks.db"} if server_of is None else {"url": server_of.url()}
    system = System(postgres_config(tmp_path, database), logger=logging.getLogger("lb_system"))
    with pytest.raises(StartupError, match="upgrade lb_system") as raised:
        await system.start()
    assert PASSWORD not in str(raised.value)


async def test_a_sqlite_file_from_before_schema_versions_is_version_1(tmp_path: Path) -> None:
    from lb_system import SqliteTaskStore

    with sqlite3.connect(tmp_path / "tasks.db") as db:
        db.execute(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, description TEXT NOT NULL "
            "DEFAULT '', done INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)"
        )
        db.execute("INSERT INTO tasks VALUES (7, 'old', '', 0, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')")
    db.close()
    store = SqliteTaskStore(tmp_path / "tasks.db")
    await store.open()
    try:
        assert (await store.get(7) or {})["title"] == "old"
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.close()


async def test_two_machines_on_one_database_share_the_tasks_and_never_share_an_id(postgres) -> None:
    from lb_system.tasks.postgres_store import PostgresTaskStore

    stores = [PostgresTaskStore(postgres.url(), pool_min=0, pool_max=3) for _ in range(2)]
    await asyncio.gather(*(store.open() for store in stores))  # both make the schema at once: one wins, no error
    try:
        created = await asyncio.gather(*(stores[i % 2].create(f"t{i}") for i in range(40)))
        assert len({task["id"] for task in created}) == 40
        tasks, total = await stores[1].list(limit=1000)
        assert total == 40 and [t["id"] for t in tasks] == sorted(t["id"] for t in created)
        first = created[0]
        assert await stores[1].get(first["id"]) == first
        assert first["created_at"].endswith("Z") and len(first["created_at"]) == len("2026-01-01T00:00:00.000Z")
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_the_database_going_away_makes_backends_503_and_they_come_back_by_themselves(
    postgres, tmp_path: Path, start_system
) -> None:
    config = postgres_config(tmp_path, {"url": postgres.url(), "pool_min": 2, "pool_max": 4})
    system = await start_system(config)
    backend = system.hosted["backend-1"].url
    acknowledged: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def health(url: str) -> int:
            async with http.get(url + "/health") as response:
                return response.status

        async def write(title: str) -> int:
            async with http.post(system.balancer_url + "/tasks", json={"title": title}) as response:
                if response.status == 201:
                    acknowledged.append((await response.json())["id"])
                return response.status

        assert await write("before") == 201
        postgres.stop()
        assert await health(backend) == 503
        async with http.post(backend + "/tasks", json={"title": "during"}) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            assert (await response.json(content_type=None))["detail"] == "Database unavailable"
        await wait_for(lambda: _status(system) == 0, message="the balancer takes both backends out")
        assert await health(system.balancer_url) == 503
        assert await write("while down") == 503  # the balancer's own: no backend serves

        postgres.start()
        await wait_for(lambda: _status(system) == 2, message="both backends back without a restart")
        for index in range(20):
            assert await write(f"after {index}") == 201
        async with http.get(system.balancer_url + "/tasks", params={"limit": "1000"}) as response:
            stored = {task["id"] for task in (await response.json())["tasks"]}
    assert set(acknowledged) <= stored and len(acknowledged) == 21


def _status(system: System) -> int:
    assert system.pool is not None
    return sum(1 for backend in system.pool.backends if backend.healthy)


async def test_no_acknowledged_write_is_lost_across_a_restart_under_load(postgres, tmp_path: Path, start_system) -> None:
    config = postgres_config(tmp_path, {"url": postgres.url(), "pool_min": 1, "pool_max": 4})
    system = await start_system(config, role="backends")
    urls = [hosted.url for hosted in system.hosted.values()]
    acknowledged: list[int] = []
    answers: dict[int, int] = {}
    stop = asyncio.Event()

    async def writer(http: aiohttp.ClientSession, url: str) -> None:
        index = 0
        while not stop.is_set():
            index += 1
            async with http.post(url + "/tasks", json={"title": f"w{index}"}) as response:
                answers[response.status] = answers.get(response.status, 0) + 1
                if response.status == 201:
                    acknowledged.append((await response.json())["id"])

    async with aiohttp.ClientSession() as http:
        writers = [asyncio.create_task(writer(http, url)) for url in urls]
        await wait_for(lambda: len(acknowledged) >= 10, message="writes before the restart")
        await asyncio.to_thread(postgres.stop)
        await wait_for(lambda: answers.get(503, 0) >= 2, message="writes refused while the database is down")
        await asyncio.to_thread(postgres.start)
        before = len(acknowledged)
        await wait_for(lambda: len(acknowledged) >= before + 20, timeout=15, message="writes after the restart")
        stop.set()
        await asyncio.gather(*writers)
    assert set(answers) <= {201, 503}, answers
    stored = {int(v) for v in postgres.psql("SELECT id FROM tasks").split()}
    assert set(acknowledged) <= stored, f"lost: {sorted(set(acknowledged) - stored)[:10]}"


@pytest.mark.parametrize("source", ["url", "password_env"])
async def test_the_password_never_shows_in_logs_errors_or_status(
    postgres, tmp_path: Path, start_system, lb_log: LogRecords, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    monkeypatch.setenv("LB_DB_PASSWORD", PASSWORD)
    database = (
        {"url": postgres.url()} if source == "url" else {"url": postgres.url(password=False), "password_env": "LB_DB_PASSWORD"}
    )
    config = postgres_config(tmp_path, database)
    seen: list[str] = [config.summary()]
    system = await start_system(config)
    (started,) = [line for line in lb_log.messages() if line.startswith("started ")]
    user = "lb:***" if source == "url" else "lb"
    assert f" database=postgresql://{user}@127.0.0.1:{postgres.port}/lb " in started
    async with aiohttp.ClientSession() as http:
        async with http.post(system.balancer_url + "/tasks", json={"title": "t"}) as response:
            assert response.status == 201
        postgres.stop()
        await wait_for(lambda: _status(system) == 0, message="backends out")
        for path in ("/status", "/errors/stats", "/tasks/1", "/metrics"):
            async with http.get(system.balancer_url + path) as response:
                seen.append(await response.text())
        async with http.get(system.hosted["backend-1"].url + "/tasks/1") as response:
            seen.append(await response.text())
        postgres.start()
    # A wrong password and a database that is down, at start-up: the errors name the URL without it.
    wrong = postgres_config(tmp_path, {"url": postgres.url().replace(PASSWORD, PASSWORD + "-wrong")})
    for bad in (wrong, config):
        if bad is config:
            postgres.stop()
        with pytest.raises(StartupError) as raised:
            await System(bad, logger=logging.getLogger("lb_system")).start()
        seen.append(str(raised.value))
    postgres.start()
    assert "password authentication failed" in seen[-2] and "lb:***@" in seen[-2]
    # An edit that needs a restart names the old and new URL, without the password.
    edited = postgres_config(tmp_path, {"url": postgres.url().replace("/lb", "/other")})
    with pytest.raises(ConfigError) as refused:
        plan_reload(config, edited, source="config.toml")
    seen.append(str(refused.value))
    with pytest.raises(ConfigError) as invalid:
        postgres_config(tmp_path, {"url": postgres.url().replace("postgresql", "mysql")})
    seen.append(str(invalid.value))
    seen += lb_log.messages(logging.DEBUG)
    seen += [record.exc_text or "" for record in lb_log.records]
    assert any("Database unavailable" in text for text in seen) and any("***" in text for text in seen)
    assert not [text for text in seen if PASSWORD in text]


async def test_a_missing_password_env_stops_start_up_naming_the_key(postgres, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LB_DB_PASSWORD", raising=False)
    config = postgres_config(tmp_path, {"url": postgres.url(password=False), "password_env": "LB_DB_PASSWORD"})
    with pytest.raises(StartupError, match=r"\[database\] password_env: LB_DB_PASSWORD is not set"):
        await System(config, logger=logging.getLogger("lb_system")).start()


async def test_the_store_answers_unavailable_not_a_crash_when_the_database_is_gone(postgres, lb_log: LogRecords) -> None:
    from lb_system.tasks.postgres_store import PostgresTaskStore

    store = PostgresTaskStore(postgres.url(), pool_min=1, pool_max=2)
    await store.open()
    try:
        postgres.stop()
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.create("x")
        # The driver's pool retries its connections: one line each in our log, no traceback, no password.
        await wait_for(lambda: any(m.startswith("database driver ") for m in lb_log.messages()), message="a driver line")
        line = next(m for m in lb_log.messages() if m.startswith("database driver "))
        assert "database=postgresql://lb:***@" in line and "reason=" in line and PASSWORD not in line
        assert not any(record.exc_info for record in lb_log.records)
        postgres.start()
        await wait_for(store.ping, message="the pool reconnects")
        assert (await store.create("y"))["title"] == "y"
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ({"url": "postgresql://u:pw@h/db", "path": "x.db"}, "[database]: set 'path' (SQLite) or 'url' (PostgreSQL), not both"),
        ({"url": "postgresql://u:pw@h/db", "pool_min": 5, "pool_max": 2}, "[database] pool_max: must be at least pool_min (5)"),
        ({"url": "http://u:pw@h/db"}, "[database] url: must look like postgresql://user@host:5432/db, got 'http://u:***@h/db'"),
    ],
)
def test_database_config_errors_name_the_key(tmp_path: Path, database: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        postgres_config(tmp_path, database)
    assert str(raised.value) == f"config.toml: {message}"


def test_a_url_without_asyncpg_installed_is_a_config_error_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "asyncpg" else real(name, *args))
    with pytest.raises(ConfigError) as raised:
        postgres_config(tmp_path, {"url": "postgresql://u:pw@h/db"})
    assert str(raised.value) == (
        "config.toml: [database] url: PostgreSQL needs asyncpg, which is not installed: pip install -e '.[postgres]'"
    )


def test_check_shows_the_database_url_without_its_password(tmp_path: Path, capsys) -> None:
    from support.config_files import toml_text

    from lb_system.cli.main import main

    data = {key: value for key, value in BASE_CONFIG.items() if key != "database"}
    path = tmp_path / "config.toml"
    path.write_text(toml_text({**data, "database": {"url": f"postgresql://lb:{PASSWORD}@db.example:5432/lb"}}))
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "database postgresql://lb:***@db.example:5432/lb" in out and PASSWORD not in out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX")
async def test_two_backends_processes_on_one_postgres_behind_a_balancer_process(postgres, tmp_path: Path) -> None:
    from support.config_files import toml_text

    database = {"url": postgres.url(password=False), "password_env": "LB_DB_PASSWORD", "pool_max": 3}
    env = {**os.environ, "LB_DB_PASSWORD": PASSWORD}
    processes: list[asyncio.subprocess.Process] = []
    urls: list[tuple[str, str]] = []
    try:
        for machine in ("a", "b"):
            folder = tmp_path / machine
            folder.mkdir()
            backends = [{"name": f"backend-{machine}", "port": 0}]
            config = {"database": database, "log": {"file": "lb.log"}, "backends": backends}
            (folder / "config.toml").write_text(toml_text(config))
            process, banner = await start_run_py("--role", "backends", cwd=folder, env=env)
            processes.append(process)
            urls += re.findall(r"(backend-\w) on (http://[\d.:]+)", banner)
        front = tmp_path / "front"
        front.mkdir()
        outside = [{"name": name, "url": url} for name, url in urls]
        (front / "config.toml").write_text(toml_text({**BASE_CONFIG, "backends": outside}))
        balancer, banner = await start_run_py("--role", "balancer", cwd=front)
        processes.append(balancer)
        found = re.search(r"balancer on (http://\S+?);", banner)
        assert found is not None
        async with aiohttp.ClientSession() as http:
            created = []
            for index in range(6):
                async with http.post(found.group(1) + "/tasks", json={"title": f"t{index}"}) as response:
                    assert response.status == 201
                    created.append((response.headers["X-Backend"], (await response.json())["id"]))
            assert {backend for backend, _ in created} == {"backend-a", "backend-b"}
            assert [task_id for _, task_id in created] == list(range(1, 7))  # one sequence for both machines
            for _, url in urls:  # each machine reads what the other wrote
                async with http.get(url + "/tasks") as response:
                    assert (await response.json())["total"] == 6
    finally:
        codes = [await stop_run_py(process) for process in reversed(processes)]
    assert codes == [0, 0, 0]
    for machine in ("a", "b"):
        log = (tmp_path / machine / "lb.log").read_text()
        assert f" database=postgresql://lb@127.0.0.1:{postgres.port}/lb " in log and PASSWORD not in log


async def test_the_pool_keeps_pool_min_connections_and_never_opens_more_than_pool_max(postgres) -> None:
    from lb_system.tasks.postgres_store import PostgresTaskStore

    def connections() -> int:
        return int(postgres.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'lb' AND pid <> pg_backend_pid()"))

    store = PostgresTaskStore(postgres.url(), pool_min=2, pool_max=3)
    await store.open()
    try:
        assert connections() == 2
        created = await asyncio.gather(*(store.create(f"t{i}") for i in range(30)))
        assert len({task["id"] for task in created}) == 30
        assert connections() == 3
    finally:
        await store.close()
    await wait_for(lambda: connections() == 0, message="every connection closed")  # a server process ends a moment later


STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SCRIPT: list[tuple[str, str, Any]] = [
    ("POST", "/tasks", {"title": "  first  ", "description": "a"}),
    ("POST", "/tasks", {"title": "zweite Aufgabe ✓", "done": True}),
    ("POST", "/tasks", {"title": "third"}),
    ("DELETE", "/tasks/3", None),
    ("POST", "/tasks", {"title": "after a delete: a new id, never 3 again"}),
    ("PUT", "/tasks/1", {"title": "replaced", "description": "", "done": True}),
    ("PATCH", "/tasks/2", {"done": False}),
    ("PATCH", "/tasks/3", {"done": False}),
    ("GET", "/tasks?done=true", None),
    ("GET", "/tasks?limit=2&offset=1", None),
    ("GET", "/tasks", None),
    ("GET", "/tasks/4", None),
    ("POST", "/tasks", {"title": ""}),
    ("GET", "/tasks?limit=0", None),
]


async def test_both_stores_give_the_same_answers_down_to_ids_ordering_and_time_format(
    postgres, tmp_path: Path, aiohttp_client
) -> None:
    from lb_system import ErrorTracker, SqliteTaskStore, make_backend_app
    from lb_system.config import ApiConfig
    from lb_system.tasks.postgres_store import PostgresTaskStore

    answers: dict[str, list[tuple[int, str | None, Any]]] = {}
    for name, store in (("sqlite", SqliteTaskStore(tmp_path / "tasks.db")), ("postgres", PostgresTaskStore(postgres.url()))):
        await store.open()
        try:
            app = make_backend_app("b", store=store, tracker=ErrorTracker(5), api=ApiConfig(), logger=logging.getLogger("t"))
            client = await aiohttp_client(app)
            answers[name] = []
            for method, path, body in SCRIPT:
                async with client.request(method, path, json=body) as response:
                    document = await response.json(content_type=None) if response.status != 204 else None
                    answers[name].append((response.status, response.headers.get("Location"), document))
            await client.close()
        finally:
            await store.close()

    def same_shape(value: Any) -> Any:
        # Times differ between runs: each must be ISO 8601 UTC to the millisecond, and is then compared as a placeholder.
        if isinstance(value, dict):
            return {key: same_shape(item) for key, item in value.items() if key != "request_id"}
        if isinstance(value, list | tuple):
            return [same_shape(item) for item in value]
        if isinstance(value, str) and value[:2] == "20" and "T" in value:
            assert STAMP.match(value), value
            return "<time>"
        return value

    assert [same_shape(answer) for answer in answers["postgres"]] == [same_shape(answer) for answer in answers["sqlite"]]
    listed = answers["sqlite"][-4][2]
    assert [task["id"] for task in listed["tasks"]] == [1, 2, 4]


# Run in a fresh interpreter where asyncpg is not installed, as far as imports can tell (the path
# finder no longer finds it): the default install, without the postgres extra.
WITHOUT_ASYNCPG = """
import asyncio, importlib.machinery, logging, sys, tomllib
from pathlib import Path

class WithoutAsyncpg(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "asyncpg" else super().find_spec(name, path, target)

sys.meta_path = [WithoutAsyncpg if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.path.insert(0, sys.argv[1])
from lb_system import ConfigError, System, parse_config

shipped = tomllib.loads((Path(sys.argv[1]) / "config.toml").read_text())
shipped["balancer"]["port"] = 0
for backend in shipped["backends"]:
    backend["port"] = 0

async def serve() -> None:
    system = System(parse_config(shipped, base_dir=Path(sys.argv[2])), logger=logging.getLogger("t"))
    await system.start()
    await system.stop()

asyncio.run(serve())
try:
    parse_config({**shipped, "database": {"url": "postgresql://u@h/db"}}, base_dir=Path(sys.argv[2]))
except ConfigError as error:
    print(error)
print("asyncpg" in sys.modules)
"""


def test_without_asyncpg_the_shipped_config_serves_and_a_url_is_an_error_naming_the_extra(tmp_path: Path) -> None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_ASYNCPG, str(root), str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "config.toml: [database] url: PostgreSQL needs asyncpg, which is not installed: pip install -e '.[postgres]'",
        "False",
    ]
    assert (tmp_path / "tasks.db").exists()
