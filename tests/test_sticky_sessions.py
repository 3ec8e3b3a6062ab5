"""Sticky sessions (`sticky_cookie`): the first answer names its backend in a cookie by an opaque
id; later requests carrying it go there while it serves, and move (the cookie re-set) when it
does not. Over real sockets, with a client that keeps cookies as a browser does."""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import trustme
from support.config_files import FAST_HEALTH
from support.through import served
from support.waiting import wait_for
from yarl import URL

from lb_system.balancing.pool import DRAINING, Backend, BackendPool
from lb_system.balancing.sticky import sticky_id
from lb_system.config import HealthConfig
from lb_system.proxy.forwarder import sticky_cookie

COOKIE = "lb_sticky"


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies, for an IP-address host too (aiohttp's jar refuses those unless unsafe)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


@pytest.fixture
async def three(fake_backends, make_config, start_system):
    servers = await fake_backends("one", "two", "three", misbehaves=False)
    entries: list[dict[str, Any]] = [{"name": s.name, "url": s.url} for s in servers]
    system = await start_system(make_config(backends=entries, health=FAST_HEALTH, balancer={"sticky_cookie": COOKIE}))
    return system, {s.name: s for s in servers}


async def first_answer(client: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """The backend that answered and the Set-Cookie it came with."""
    async with client.get(url + "/x") as response:
        assert response.status == 200
        return response.headers["X-Backend"], response.headers.get("Set-Cookie", "")


def test_the_id_is_opaque_stable_and_distinct_per_backend() -> None:
    assert sticky_id("backend-1") == sticky_id("backend-1")  # the same in every process and after a restart
    assert sticky_id("backend-1") != sticky_id("backend-2")
    assert "backend" not in sticky_id("backend-1") and len(sticky_id("backend-1")) == 24


def test_the_cookie_is_http_only_lax_site_wide_and_secure_under_tls() -> None:
    assert sticky_cookie("s", "abc", secure=False) == "s=abc; Path=/; HttpOnly; SameSite=Lax"
    assert sticky_cookie("s", "abc", secure=True) == "s=abc; Path=/; HttpOnly; SameSite=Lax; Secure"


def test_a_pinned_backend_is_chosen_only_while_it_may_take_the_request() -> None:
    primary = Backend("primary", "http://p", hosted=False, healthy=True, checked=True)
    spare = Backend("spare", "http://s", hosted=False, backup=True, healthy=True, checked=True)
    other = Backend("other", "http://o", hosted=False, healthy=True, checked=True)
    pool = BackendPool([primary, other, spare], health=HealthConfig())
    assert {pool.choose(pinned=other.sticky_id) for _ in range(5)} == {other}
    assert pool.choose(pinned="forged") in (primary, other)
    assert pool.choose(pinned=spare.sticky_id) in (primary, other)  # a backup while primaries serve: moved
    assert pool.choose(pinned=other.sticky_id, exclude=[other]) is primary  # a retry goes elsewhere


def test_an_ejected_pinned_backend_is_not_chosen() -> None:
    pinned = Backend("pinned", "http://p", hosted=False, healthy=True, checked=True)
    others = [Backend(name, f"http://{name}", hosted=False, healthy=True, checked=True) for name in ("a", "b")]
    pool = BackendPool([pinned, *others], health=HealthConfig(passive_fall=1))
    assert pool.choose(pinned=pinned.sticky_id) is pinned
    pool.record_passive_failure(pinned, "connection reset")  # one failure ejects it (passive_fall = 1)
    assert pinned.ejected_until is not None
    assert {pool.choose(pinned=pinned.sticky_id) for _ in range(4)} == set(others)


async def test_a_sticky_cookie_holds_across_50_requests_and_moves_when_its_backend_dies(three, browser, http) -> None:
    system, servers = three
    url = system.balancer_url
    pinned, set_cookie = await first_answer(browser, url)
    value = browser.cookie_jar.filter_cookies(URL(url))[COOKIE].value
    assert set_cookie == f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax"
    # Opaque: neither the backend's name nor its address.
    assert pinned not in value and str(servers[pinned].port) not in value and "127.0.0.1" not in value

    for _ in range(50):
        backend, again = await first_answer(browser, url)
        assert (backend, again) == (pinned, "")  # the same backend, and no cookie re-set
    assert set(await served(http, url, 6)) == {"one", "two", "three"}  # a client without it is balanced

    await servers[pinned].stop()
    await wait_for(lambda: not system.pool.get(pinned).healthy, message=f"{pinned} down")
    moved, reset = await first_answer(browser, url)
    new_value = browser.cookie_jar.filter_cookies(URL(url))[COOKIE].value
    assert moved != pinned and reset == f"{COOKIE}={new_value}; Path=/; HttpOnly; SameSite=Lax" and new_value != value
    assert Counter([(await first_answer(browser, url))[0] for _ in range(20)]) == {moved: 20}


async def test_a_draining_backend_lets_its_pinned_clients_go(three, browser) -> None:
    system, _ = three
    url = system.balancer_url
    pinned, _ = await first_answer(browser, url)
    system.membership.set_admin_state(system.pool.get(pinned), DRAINING)
    moved, reset = await first_answer(browser, url)
    assert moved != pinned and reset.startswith(f"{COOKIE}=")


async def test_a_forged_or_unknown_cookie_is_ignored_and_replaced(three, http) -> None:
    system, _ = three
    for value in ("forged", sticky_id("gone-backend"), "127.0.0.1:5001"):
        async with http.get(system.balancer_url + "/x", headers={"Cookie": f"{COOKIE}={value}"}) as response:
            assert response.status == 200
            chosen = system.pool.get(response.headers["X-Backend"])
            assert response.headers["Set-Cookie"].startswith(f"{COOKIE}={chosen.sticky_id};")


async def test_without_sticky_cookie_no_cookie_is_set(fake_backends, make_config, start_system, http) -> None:
    (server,) = await fake_backends("one", misbehaves=False)
    system = await start_system(make_config(backends=[{"name": "one", "url": server.url}], health=FAST_HEALTH))
    async with http.get(system.balancer_url + "/x") as response:
        assert response.status == 200 and "Set-Cookie" not in response.headers


async def test_a_websocket_upgrade_sets_and_follows_the_sticky_cookie(fake_backends, make_config, start_system, browser) -> None:
    servers = await fake_backends("one", "two", "three")  # misbehaving ones serve /ws
    entries: list[dict[str, Any]] = [{"name": s.name, "url": s.url} for s in servers]
    system = await start_system(make_config(backends=entries, health=FAST_HEALTH, balancer={"sticky_cookie": COOKIE}))
    seen = []
    for _ in range(4):
        async with browser.ws_connect(system.balancer_url + "/ws") as ws:
            await ws.send_str("hi")
            seen.append((await ws.receive_str()).split(":")[0])
    value = browser.cookie_jar.filter_cookies(URL(system.balancer_url))[COOKIE].value
    assert len(set(seen)) == 1 and value == sticky_id(seen[0])


async def test_the_cookie_is_secure_over_tls(fake_backends, make_config, start_system, tmp_path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (server,) = await fake_backends("one", misbehaves=False)
    balancer = {"tls_cert": "cert.pem", "tls_key": "key.pem", "sticky_cookie": COOKIE}
    system = await start_system(make_config(backends=[{"name": "one", "url": server.url}], health=FAST_HEALTH, balancer=balancer))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as client:
        async with client.get(system.balancer_url + "/x") as response:
            assert response.status == 200
            assert response.headers["Set-Cookie"] == f"{COOKIE}={sticky_id('one')}; Path=/; HttpOnly; SameSite=Lax; Secure"
