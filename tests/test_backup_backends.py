"""Backup backends (`[[backends]] backup = true`): traffic only while no primary serves, over
real sockets, and the pool's choice as pure policy."""

from __future__ import annotations

from collections import Counter
from typing import Any

from support.config_files import FAST_HEALTH
from support.through import backend_statuses, served
from support.waiting import wait_for

from lb_system.balancing.pool import DISABLED, Backend, BackendPool
from lb_system.config import BackendConfig, HealthConfig


def pool_of(*specs: tuple[str, bool]) -> BackendPool:
    backends = [Backend(n, f"http://{n}", hosted=False, backup=backup, healthy=True, checked=True) for n, backup in specs]
    return BackendPool(backends, health=HealthConfig())


def named(pool: BackendPool, name: str) -> Backend:
    backend = pool.get(name)
    assert backend is not None
    return backend


def picks(pool: BackendPool, count: int, exclude: tuple[Backend, ...] = ()) -> Counter[str]:
    chosen = [pool.choose(exclude=exclude) for _ in range(count)]
    return Counter(b.name if b is not None else "-" for b in chosen)


def test_backups_get_nothing_while_a_primary_serves() -> None:
    pool = pool_of(("a", False), ("b", False), ("spare", True))
    assert picks(pool, 10) == {"a": 5, "b": 5}
    named(pool, "a").healthy = False
    assert picks(pool, 4) == {"b": 4}


def test_backups_share_the_traffic_once_no_primary_serves() -> None:
    pool = pool_of(("a", False), ("spare-1", True), ("spare-2", True))
    pool.set_admin_state(named(pool, "a"), DISABLED)  # disabled or draining is not serving either
    assert picks(pool, 4) == {"spare-1": 2, "spare-2": 2}
    assert pool.has_candidate()


def test_a_retry_goes_to_another_primary_and_never_to_a_backup_while_one_serves() -> None:
    pool = pool_of(("a", False), ("b", False), ("spare", True))
    a, b = named(pool, "a"), named(pool, "b")
    assert picks(pool, 2, exclude=(a,)) == {"b": 2}
    assert pool.choose(exclude=(a, b)) is None and not pool.has_candidate(exclude=(a, b))


async def test_a_backup_takes_over_when_every_primary_is_killed_and_hands_back(
    fake_backends, make_config, start_system, http
) -> None:
    one, two, spare = await fake_backends("one", "two", "spare", misbehaves=False)
    entries: list[dict[str, Any]] = [{"name": s.name, "url": s.url} for s in (one, two, spare)]
    entries[2]["backup"] = True
    system = await start_system(make_config(backends=entries, health=FAST_HEALTH))
    url = system.balancer_url
    shown = await backend_statuses(http, url)
    assert [shown[n]["backup"] for n in ("one", "two", "spare")] == [False, False, True]
    assert shown["spare"]["serving"] is True  # up and ready, just not chosen
    assert await served(http, url, 10) == {"one": 5, "two": 5}

    await one.stop()
    await wait_for(lambda: not system.pool.get("one").healthy, message="one down")
    assert await served(http, url, 6) == {"two": 6}  # one primary left: the backup still waits

    await two.stop()
    await wait_for(lambda: not system.pool.get("two").healthy, message="two down")
    assert await served(http, url, 6) == {"spare": 6}

    await one.start()  # the same port again
    await wait_for(lambda: system.pool.get("one").serving, message="one back")
    assert await served(http, url, 6) == {"one": 6}


def test_a_reload_can_make_a_backend_a_backup_and_back() -> None:
    pool = pool_of(("a", False), ("b", False))
    b = named(pool, "b")
    pool.configure(b, BackendConfig(name="b", url="http://b", backup=True))
    assert picks(pool, 4) == {"a": 4}
    pool.configure(b, BackendConfig(name="b", url="http://b"))
    assert picks(pool, 4) == {"a": 2, "b": 2}
