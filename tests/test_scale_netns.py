"""The scale test: hosts made of network namespaces on one private /24 (tests/support/netns.py).

    .10       PostgreSQL (a temporary cluster, run as its own user)
    .21-.23   three `python run.py --role backends` hosts on that database
    .31, .32  two `python run.py --role balancer --processes 2` hosts in front of them
    .1        this process: the load generator, writes and reads spread over both balancers

Under load: a whole backend host is killed (SIGKILL to every process in it, its link cut), then
brought back; PostgreSQL is stopped for 5 s, then started. No GET may fail outside the database's
outage, no acknowledged POST may be missing from PostgreSQL, and during the outage every answer is
a 503 with Retry-After. The figures (time to detection, time until the host serves again, time to
recover from the outage) are printed and written to scale-figures.json in the test's folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from support import netns, postgres
from support.netns import Host, PrivateNetwork

REPO = Path(__file__).resolve().parent.parent
RUN = str(REPO / "run.py")
BACKEND_PORT, BALANCER_PORT, INSTANCE_PORT = 5001, 8080, 9101
PASSWORD_ENV = "LB_DB_PASSWORD"
WORKERS = 6  # concurrent clients of the load generator


def _skip_reason() -> str | None:
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg is not installed (pip install -e '.[postgres]')"
    return netns.unavailable_reason() or postgres.unavailable_reason()


@pytest.fixture(scope="module")
def skip_reason() -> str | None:
    return _skip_reason()


@dataclass
class Outcome:
    at: float
    method: str
    status: int  # 0: no answer at all
    retry_after: bool
    answered_by: str


@dataclass
class Load:
    """Closed-loop clients alternating between the balancers: a POST, then a GET of an acknowledged task."""

    balancers: list[str]
    acked: list[int] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    async def client(self, session: aiohttp.ClientSession, number: int, stop: asyncio.Event, deadline: float) -> None:
        turns = itertools.count(number)
        while not stop.is_set() and time.monotonic() < deadline:
            turn = next(turns)
            base = self.balancers[turn % len(self.balancers)]
            if turn % 2 == 0 or not self.acked:
                method, url, body = "POST", base + "/tasks", {"title": f"scale {number}-{turn}"}
            else:
                method, url, body = "GET", f"{base}/tasks/{random.choice(self.acked)}", None
            status, retry_after, answered_by = 0, False, ""
            try:
                async with session.request(method, url, json=body) as response:
                    payload = await response.read()
                    status, answered_by = response.status, response.headers.get("X-Backend", "")
                    retry_after = "Retry-After" in response.headers
                    if status == 201:
                        self.acked.append(json.loads(payload)["id"])
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.outcomes.append(Outcome(time.monotonic(), method, status, retry_after, answered_by))
            if status == 0 or status >= 500:
                await asyncio.sleep(0.01)  # pace a client that gets nothing but failures

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.at < end]


class Fleet:
    """The processes of the scale test, each in its host."""

    def __init__(self, net: PrivateNetwork, folder: Path, database_url: str, password: str) -> None:
        self.net, self.folder = net, folder
        self.database_url, self.password = database_url, password
        self.processes: list[asyncio.subprocess.Process] = []

    async def spawn(self, host: Host, config: str, *args: str) -> asyncio.subprocess.Process:
        folder = self.folder / host.name
        folder.mkdir(exist_ok=True)
        (folder / "config.toml").write_text(config)
        env = {**os.environ, PASSWORD_ENV: self.password}
        with open(folder / "stderr.txt", "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *host.command(sys.executable, RUN, *args, "--config", str(folder / "config.toml")),
                cwd=folder, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def backends_config(self, host: Host) -> str:
        return (
            f'[database]\nurl = "{self.database_url}"\npassword_env = "{PASSWORD_ENV}"\npool_min = 1\npool_max = 4\n'
            '[log]\nfile = "backends.log"\n'
            f'[[backends]]\nname = "{host.name}"\nhost = "{host.address}"\nport = {BACKEND_PORT}\n'
        )

    @staticmethod
    def balancer_config(host: Host, backends: list[Host]) -> str:
        listed = "".join(f'[[backends]]\nname = "{b.name}"\nurl = "http://{b.address}:{BACKEND_PORT}"\n' for b in backends)
        return (
            f'[balancer]\nhost = "{host.address}"\nport = {BALANCER_PORT}\nreuse_port = true\n'
            f"instance_port = {INSTANCE_PORT}\nshutdown_grace = 2.0\n"
            "[health]\ninterval = 0.2\ntimeout = 0.5\nrise = 2\nfall = 2\n"
            "[proxy]\nconnect_timeout = 0.5\nper_try_timeout = 2.0\n"
            '[log]\nfile = "balancer-{pid}.log"\n' + listed
        )

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def serving(http: aiohttp.ClientSession, instance: str) -> set[str] | None:
    """The backends an instance serves, or None when it does not answer."""
    try:
        async with http.get(instance + "/status") as response:
            document = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return {b["name"] for b in document["backends"] if b["serving"]}


async def health_status(http: aiohttp.ClientSession, host: Host) -> int:
    """A backend host's own /health status (0: no answer)."""
    try:
        async with http.get(f"http://{host.address}:{BACKEND_PORT}/health") as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def until(condition: Callable[[], Awaitable[bool]], *, timeout: float, what: str, every: float = 0.05) -> float:
    """Poll the async `condition` until true; the seconds it took, or fail after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await condition():
            return time.monotonic() - start
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def network(skip_reason: str | None) -> Iterator[PrivateNetwork]:
    if skip_reason is not None:
        pytest.skip(f"scale test: {skip_reason}")
    with PrivateNetwork() as net:
        yield net


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_fleet_survives_a_dead_backend_host_and_a_database_outage(network: PrivateNetwork, tmp_path: Path) -> None:
    net = network
    net.join(1)
    db_host = net.add_host("pg", 10)
    backend_hosts = [net.add_host(f"bk{i}", 20 + i) for i in (1, 2, 3)]
    balancer_hosts = [net.add_host(f"lb{i}", 30 + i) for i in (1, 2)]

    # The namespace is the database host's alone: PostgreSQL's usual port is free there.
    database = postgres.TemporaryPostgres(host=db_host.address, port=5432, wrap=db_host.command())
    await asyncio.to_thread(database.start)
    fleet = Fleet(net, tmp_path, database.url(password=False), database.password)
    figures: dict[str, object] = {}
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            backends = {
                host.name: await fleet.spawn(host, fleet.backends_config(host), "--role", "backends") for host in backend_hosts
            }

            async def backends_up() -> bool:
                return all([await health_status(http, host) == 200 for host in backend_hosts])

            await until(backends_up, timeout=60, what="three backend hosts answering /health")
            for host in balancer_hosts:
                await fleet.spawn(host, fleet.balancer_config(host, backend_hosts), "--role", "balancer", "--processes", "2")
            instances = [f"http://{h.address}:{INSTANCE_PORT + i}" for h in balancer_hosts for i in (0, 1)]
            everyone = {h.name for h in backend_hosts}

            async def all_instances_serve(names: set[str]) -> bool:
                return all(found == names for found in await asyncio.gather(*(serving(http, i) for i in instances)))

            await until(lambda: all_instances_serve(everyone), timeout=60, what="4 balancer processes serving 3 backends")

            # Load: writes and reads over both balancers, for as long as the scenario runs (bounded).
            load = Load([f"http://{h.address}:{BALANCER_PORT}" for h in balancer_hosts])
            stop = asyncio.Event()
            connector = aiohttp.TCPConnector(limit=WORKERS * 2)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as clients:
                deadline = time.monotonic() + 300
                workers = [asyncio.create_task(load.client(clients, n, stop, deadline)) for n in range(WORKERS)]
                try:

                    async def warmed_up() -> bool:
                        return sum(o.status in (200, 201) for o in load.outcomes) >= 100

                    await until(warmed_up, timeout=30, what="100 answered requests before anything fails")

                    # 1. A whole backend host dies: every process killed, its link cut.
                    victim = backend_hosts[1]
                    killed_at = time.monotonic()
                    net.kill_all(victim)
                    net.cut(victim)
                    first_seen: dict[str, float] = {}

                    async def detected() -> bool:
                        for instance, found in zip(instances, await asyncio.gather(*(serving(http, i) for i in instances))):
                            if found is not None and victim.name not in found:
                                first_seen.setdefault(instance, time.monotonic() - killed_at)
                        return len(first_seen) == len(instances)

                    await until(detected, timeout=30, what="the dead host taken out")
                    figures["detection_s_all_balancers"] = round(max(first_seen.values()), 3)
                    figures["detection_s_first_balancer"] = round(min(first_seen.values()), 3)
                    await asyncio.sleep(2)  # traffic goes on over the two hosts left

                    # 2. The host comes back: its link, then its process.
                    await backends[victim.name].wait()
                    restarted_at = time.monotonic()
                    net.restore(victim)
                    backends[victim.name] = await fleet.spawn(victim, fleet.backends_config(victim), "--role", "backends")
                    await until(lambda: all_instances_serve(everyone), timeout=60, what="the host serving again")
                    figures["host_serving_again_s"] = round(time.monotonic() - restarted_at, 3)
                    host_phase_end = time.monotonic()
                    await asyncio.sleep(1)

                    # 3. PostgreSQL stops for 5 s under load, then starts again.
                    outage_start = time.monotonic()
                    await asyncio.to_thread(database.stop, "fast")
                    await asyncio.sleep(1)
                    figures["backend_health_during_outage"] = [await health_status(http, h) for h in backend_hosts]
                    await asyncio.sleep(max(0.0, 5 - (time.monotonic() - outage_start)))  # the rest of the outage
                    started_at = time.monotonic()
                    await asyncio.to_thread(database.start)
                    await until(lambda: all_instances_serve(everyone), timeout=60, what="recovery after the outage")
                    figures["database_recovery_s"] = round(time.monotonic() - started_at, 3)
                    reopened = time.monotonic()

                    async def both_ways_through_both() -> bool:
                        recent = load.between(reopened, time.monotonic())
                        ok = {(o.method, o.status) for o in recent if o.status in (200, 201)}
                        return {("GET", 200), ("POST", 201)} <= ok

                    await until(both_ways_through_both, timeout=30, what="reads and writes answered after the outage")
                    outage_end = time.monotonic()
                    figures["database_outage_s"] = round(started_at - outage_start, 3)
                    await asyncio.sleep(1)
                finally:
                    stop.set()
                    await asyncio.gather(*workers)

            figures["requests"] = len(load.outcomes)
            figures["acknowledged_posts"] = len(load.acked)
            outside_outage = [o for o in load.outcomes if not outage_start <= o.at < outage_end]
            failed_gets = [o for o in outside_outage if o.method == "GET" and o.status != 200]
            figures["gets_outside_outage"] = sum(o.method == "GET" for o in outside_outage)
            figures["failed_gets"] = len(failed_gets)
            during_kill = load.between(killed_at, host_phase_end)
            figures["requests_while_host_dead_or_back"] = len(during_kill)
            figures["failed_posts_while_host_dead"] = sum(o.method == "POST" and o.status != 201 for o in during_kill)
            during_outage = load.between(outage_start, outage_end)
            unanswered = [o for o in during_outage if o.status not in (200, 201) and not (o.status == 503 and o.retry_after)]
            figures["outage_requests"] = len(during_outage)
            figures["outage_503s"] = sum(o.status == 503 for o in during_outage)
            figures["outage_503s_from_balancers"] = sum(o.status == 503 and o.answered_by == "balancer" for o in during_outage)
            stored = {int(x) for x in (await asyncio.to_thread(database.psql, "SELECT id FROM tasks")).split()}
            missing = sorted(set(load.acked) - stored)
            figures["acknowledged_posts_missing"] = len(missing)
    finally:
        await fleet.stop_all()
        await asyncio.to_thread(database.cleanup)
        (tmp_path / "scale-figures.json").write_text(json.dumps(figures, indent=2) + "\n")
        print("scale figures:", json.dumps(figures))

    assert failed_gets == [], f"{len(failed_gets)} GETs failed: {failed_gets[:5]}"
    assert missing == [], f"{len(missing)} acknowledged POSTs are not in PostgreSQL: {missing[:10]}"
    assert unanswered == [], f"answers during the outage other than 2xx or 503 with Retry-After: {unanswered[:5]}"
    assert figures["backend_health_during_outage"] == [503, 503, 503], "the backends' /health did not turn 503"
    assert figures["outage_503s_from_balancers"], "the balancers never answered 503 themselves during the outage"
