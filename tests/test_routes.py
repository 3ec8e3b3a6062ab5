"""Routes and pools, the policy half: [pools.NAME] resolved over the global keys, [[routes]]
validated, and the route table's choice, without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.clock import FakeClock

from lb_system import ConfigError, load_config, parse_config
from lb_system.balancing.pools import Pools
from lb_system.balancing.routes import Route, RouteTable, request_host

TWO_POOLS = [{"name": "api-1", "port": 5001, "pool": "api"}, {"name": "web-1", "port": 5002}]


def test_without_pools_every_backend_is_in_the_default_pool_and_nothing_is_routed() -> None:
    config = parse_config({})
    assert list(config.pools) == ["default"] and config.routes == [] and not config.routed
    assert "pools" not in config.summary()
    assert {b.pool for b in config.backends} == {"default"}
    default = config.pools["default"]
    assert (default.strategy, default.hash_on, default.health) == ("round_robin", "client_ip", config.health)


def test_a_pool_takes_every_key_it_does_not_set_from_balancer_and_health() -> None:
    config = parse_config(
        {
            "balancer": {"strategy": "consistent_hash", "hash_on": "path"},
            "health": {"interval": 5.0, "path": "/ping", "fall": 4},
            "backends": TWO_POOLS,
            "pools": {"api": {"strategy": "least_connections", "slow_start": 30.0, "health": {"path": "/ready", "rise": 5}}},
        }
    )
    api, default = config.pools["api"], config.pools["default"]
    assert (api.strategy, api.hash_on, api.slow_start) == ("least_connections", "path", 30.0)
    assert (api.health.path, api.health.rise, api.health.interval, api.health.fall) == ("/ready", 5, 5.0, 4)
    assert (default.strategy, default.health) == ("consistent_hash", config.health)
    assert config.routed  # backends in two pools
    assert "2 pools, 0 routes" in config.summary()


def test_sticky_cookie_slow_start_and_check_settings_fall_back_per_key() -> None:
    config = parse_config(
        {
            "balancer": {"sticky_cookie": "lb"},
            "health": {"slow_start": 10.0, "expect_body": "ok", "expect_status": "200-299"},
            "backends": TWO_POOLS,
            "pools": {"api": {"sticky_cookie": "api_sid", "slow_start": 30.0, "health": {"expect_status": "200"}}},
        }
    )
    api, default = config.pools["api"], config.pools["default"]
    assert (default.sticky_cookie, default.slow_start, default.health.slow_start) == ("lb", 10.0, 10.0)
    assert (api.sticky_cookie, api.slow_start, api.health.slow_start) == ("api_sid", 30.0, 30.0)
    assert (api.health.expect_status, api.health.expect_body) == ("200", "ok")
    # slow_start written in the pool's health table counts as the pool's own.
    config = parse_config({"backends": TWO_POOLS, "pools": {"api": {"health": {"slow_start": 5.0}}}})
    assert (config.pools["api"].slow_start, config.pools["default"].slow_start) == (5.0, 0.0)


def test_a_route_host_and_prefix_are_normalised_and_named() -> None:
    written = {"host": "*.Example.COM.", "path_prefix": "/api/", "pool": "api", "strip_prefix": True}
    config = parse_config({"backends": TWO_POOLS, "routes": [written]})
    (route,) = config.routes
    assert (route.host, route.path_prefix, route.strip_prefix, route.describe()) == (
        "*.example.com",
        "/api",
        True,
        "*.example.com/api",
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('pool = "bad name"', "[[backends]] #1 (api-1) pool: String should match pattern"),
        ("pool = 3", "[[backends]] #1 (api-1) pool: Input should be a valid string"),
        ('[pools.api]\nstrategy = "fastest"', "[pools.api] strategy: must be one of"),
        ('[pools.api]\nhash_on = "cookie"', "[pools.api] hash_on: invalid hash_on 'cookie'"),
        ('[pools.api]\nsticky_cookie = "a b"', "[pools.api] sticky_cookie: must be a cookie name"),
        ("[pools.api]\nsticky_cookie = 5", "[pools.api] sticky_cookie: Input should be a valid string"),
        ("[pools.api]\nslow_start = -1.0", "[pools.api] slow_start: Input should be greater than or equal to 0"),
        ('[pools.api]\nslow_start = "5"', "[pools.api] slow_start: Input should be a valid number"),
        ("[pools.api]\ncolour = 1", "[pools.api] colour: unknown key"),
        ("[pools]\napi = 5", "[pools.api]: Input should be a valid dictionary"),
        ('[pools."a b"]', "[pools] 'a b': String should match pattern"),
        ("[pools.api.health]\ninterval = 0.001", "[pools.api.health] interval: Input should be greater than or equal to 0.1"),
        ('[pools.api.health]\npath = "ready"', "[pools.api.health] path: must start with '/'"),
        ("[pools.api.health]\nfal = 3", "[pools.api.health] fal: unknown key"),
        ("[pools.api.health]\nejection_time = 20.0\nmax_ejection_time = 15.0", "[pools.api.health] max_ejection_time"),
        ('[[routes]]\npath_prefix = "/api"', "[[routes]] #1 pool: Field required"),
        ('[[routes]]\npool = "nobody"', "[[routes]] #1 pool: pool 'nobody' has no backends"),
        ('[pools.empty]\n[[routes]]\npool = "empty"', "[[routes]] #1 pool: pool 'empty' has no backends"),
        ('[[routes]]\npool = "api"\n[[routes]]\npool = "default"\npath_prefix = "/"', "[[routes]] #2: duplicate of route #1 (/)"),
        (
            '[[routes]]\npool = "api"\nhost = "A.example.com"\n[[routes]]\npool = "api"\nhost = "a.example.com."',
            "[[routes]] #2: duplicate of route #1 (a.example.com/)",
        ),
        ('[[routes]]\npool = "api"\nhost = "example.com:8080"', "[[routes]] #1 host: a route's host has no port"),
        ('[[routes]]\npool = "api"\nhost = "*"', "[[routes]] #1 host: must be a host name or '*.example.com'"),
        ('[[routes]]\npool = "api"\nhost = "bad host"', "[[routes]] #1 host: must be a host name"),
        ('[[routes]]\npool = "api"\nhost = 5', "[[routes]] #1 host: Input should be a valid string"),
        ('[[routes]]\npool = "api"\npath_prefix = "api"', "[[routes]] #1 path_prefix: must start with '/'"),
        ('[[routes]]\npool = "api"\npath_prefix = "/a?b"', "[[routes]] #1 path_prefix: must be a plain decoded path"),
        ('[[routes]]\npool = "api"\npath_prefix = "/a/../b"', "[[routes]] #1 path_prefix: must not hold empty, '.' or '..'"),
        ('[[routes]]\npool = "api"\nstrip_prefix = "yes"', "[[routes]] #1 strip_prefix: Input should be a valid boolean"),
        ('[[routes]]\npool = "api"\nweight = 2', "[[routes]] #1 weight: unknown key"),
        ("routes = 5", "[routes]: Input should be a valid list"),
    ],
)
def test_a_bad_pool_or_route_is_one_line_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    backends = '[[backends]]\nname = "api-1"\nport = 5001\npool = "api"\n[[backends]]\nname = "web-1"\nport = 5002\n'
    if toml.startswith("pool ="):  # a key of the first backend
        backends = backends.replace('pool = "api"\n', toml + "\n")
        toml = ""
    path = tmp_path / "config.toml"
    # Top-level keys first: TOML puts a bare key after a table inside that table.
    path.write_text(toml + "\n" + backends if toml.startswith("routes") else backends + toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM:8080", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", None),
        (None, None),
    ],
)
def test_the_request_host_loses_its_port_and_case(host: str | None, expected: str | None) -> None:
    assert request_host(host) == expected


def _table(*routes: Route) -> RouteTable:
    return RouteTable(routes)


def test_an_exact_host_beats_a_wildcard_which_beats_no_host() -> None:
    exact, wildcard, anywhere = Route("exact", "api.example.com"), Route("wild", "*.example.com"), Route("any")
    table = _table(anywhere, wildcard, exact)
    assert table.match("API.example.com:8080", "/x") is exact
    assert table.match("www.example.com", "/x") is wildcard
    assert table.match("a.b.example.com", "/x") is wildcard  # one or more labels
    assert table.match("example.com", "/x") is anywhere  # the bare domain is no subdomain
    assert table.match("notexample.com", "/x") is anywhere
    assert table.match(None, "/x") is anywhere


def test_the_longest_matching_prefix_wins_on_whole_segments() -> None:
    root, api, items = Route("root"), Route("api", path_prefix="/api"), Route("items", path_prefix="/api/items")
    table = _table(root, items, api)
    assert table.match("h", "/api") is api
    assert table.match("h", "/api/") is api
    assert table.match("h", "/api/x") is api
    assert table.match("h", "/api/items/3") is items
    assert table.match("h", "/apix") is root
    assert table.match("h", "/api/itemsx") is api
    assert table.match("h", "/") is root


def test_a_host_whose_prefixes_do_not_cover_the_path_falls_to_the_next_tier() -> None:
    exact_api = Route("exact-api", "shop.example.com", "/api")
    wildcard = Route("wild", "*.example.com", "/static")
    anywhere = Route("any", None, "/")
    table = _table(exact_api, wildcard, anywhere)
    assert table.match("shop.example.com", "/api/1") is exact_api
    assert table.match("shop.example.com", "/static/a.css") is wildcard
    assert table.match("shop.example.com", "/other") is anywhere


def test_the_longer_wildcard_suffix_wins() -> None:
    broad, narrow = Route("broad", "*.example.com"), Route("narrow", "*.eu.example.com")
    table = _table(broad, narrow)
    assert table.match("shop.eu.example.com", "/") is narrow
    assert table.match("eu.example.com", "/") is broad


def test_no_route_matches_gives_none() -> None:
    table = _table(Route("api", "api.example.com"), Route("docs", path_prefix="/docs"))
    assert table.match("other.example.com", "/api") is None
    assert table.match(None, "/") is None
    assert RouteTable().match("x", "/") is None and not RouteTable()


@pytest.mark.parametrize(
    ("target", "resolved", "sent"),
    [
        ("/api/items?x=1", "/api/items", "/items?x=1"),
        ("/api", "/api", "/"),
        ("/api?x=1", "/api", "/?x=1"),
        ("/api/", "/api/", "/"),
        ("/api/a%20b", "/api/a b", "/a%20b"),
        ("/x/../api/items?q", "/api/items", "/items?q"),  # spelled otherwise: the resolved path, quoted
        ("/x/../api/a b", "/api/a b", "/a%20b"),
    ],
)
def test_strip_prefix_takes_the_prefix_off_the_target(target: str, resolved: str, sent: str) -> None:
    assert Route("api", path_prefix="/api", strip_prefix=True).upstream_target(target, resolved) == sent
    assert Route("api", path_prefix="/api").upstream_target(target, resolved) == target
    assert Route("api", strip_prefix=True).upstream_target(target, resolved) == target  # "/" strips nothing


def test_a_table_is_built_from_the_config() -> None:
    config = parse_config(
        {"backends": TWO_POOLS, "routes": [{"host": "api.example.com", "pool": "api"}, {"path_prefix": "/v1", "pool": "api"}]}
    )
    table = RouteTable.from_config(config.routes)
    matched = table.match("api.example.com", "/")
    assert matched is not None and (matched.pool, matched.name) == ("api", "api.example.com/")
    matched = table.match("web.example.com", "/v1/x")
    assert matched is not None and matched.name == "/v1"
    assert table.match("web.example.com", "/v2") is None


SIX = [{"name": f"api-{n}", "url": f"http://127.0.0.1:{9000 + n}", "pool": "api"} for n in (1, 2, 3)] + [
    {"name": f"web-{n}", "url": f"http://127.0.0.1:{9100 + n}"} for n in (1, 2, 3)
]


def _pools(**health: object) -> Pools:
    config = parse_config({"health": health, "backends": SIX})
    pools = Pools.from_config(config, {b.name: str(b.url) for b in config.backends}, clock=FakeClock())
    for backend in pools.backends:
        pools.pool_of(backend).record_check(backend, True, "200", 1.0)
    return pools


def test_max_ejection_percent_counts_within_the_pool() -> None:
    pools = _pools(passive_fall=1, max_ejection_percent=50)
    api = pools["api"]
    first, second, _ = api.backends
    api.record_passive_failure(first, "reset")
    assert not first.healthy
    # 2 of 6 backends would be within 50% of the whole system; 2 of the api pool's 3 are not.
    api.record_passive_failure(second, "reset")
    assert second.healthy and api.choose() is not None


def test_a_request_is_routed_to_its_pool_or_to_none() -> None:
    config = parse_config({"backends": SIX[:3], "routes": [{"path_prefix": "/api", "pool": "api"}]})
    pools = Pools.from_config(config, {b.name: str(b.url) for b in config.backends})
    pool, route = pools.route("h", "/api/x")
    assert pool is pools["api"] and route is not None and route.name == "/api"
    assert pools.route("h", "/x") == (None, None)  # the default pool has no backends: a 404
    alone = parse_config({"backends": []})
    assert Pools.from_config(alone, {}).route("h", "/x")[0] is not None  # no backend anywhere: the usual 503


async def test_a_backend_moved_to_another_pool_takes_its_drain_along() -> None:
    pools = _pools()
    web_1 = pools.get("web-1")
    assert web_1 is not None
    pools.pool_of(web_1).acquire(web_1)
    pools.pool_of(web_1).set_admin_state(web_1, "draining")
    members = [(b, "api" if b is web_1 else b.pool) for b in pools.backends]
    pools.assign(parse_config({"backends": SIX}).pools, members, routes=RouteTable())
    api = pools.pool_of(web_1)
    assert api is pools["api"] and web_1 in api.backends and web_1 not in pools["default"].backends
    api.release(web_1)
    assert await api.wait_drained(web_1, 1.0) and web_1.drained_at is not None


def test_a_backend_moved_to_another_pool_keeps_its_slow_start() -> None:
    config = parse_config({"health": {"slow_start": 60.0, "rise": 1, "fall": 1}, "backends": SIX})
    clock = FakeClock()
    pools = Pools.from_config(config, {b.name: str(b.url) for b in config.backends}, clock=clock)
    web_1 = pools.get("web-1")
    assert web_1 is not None
    default = pools.pool_of(web_1)
    for backend in pools.backends:
        pools.pool_of(backend).record_check(backend, True, "200", 1.0)
    default.record_check(web_1, False, "503", 1.0)
    default.record_check(web_1, True, "200", 1.0)  # back up: ramping from 10%
    assert web_1.effective_weight(clock()) < web_1.weight
    members = [(b, "api" if b is web_1 else b.pool) for b in pools.backends]
    pools.assign(config.pools, members, routes=RouteTable())
    api = pools["api"]
    picks = [api.choose() for _ in range(100)]
    # Its share in the api pool follows the ramp (about 1 in 31 at 10%), not its whole weight (1 in 4).
    assert 1 <= picks.count(web_1) <= 8, picks.count(web_1)
