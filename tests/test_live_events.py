"""GET /events (Server-Sent Events) and GET / over real sockets: a snapshot on connect, updates
after, work only while someone listens, several clients, and a shutdown that ends every stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from support.waiting import wait_for

FAST_FEED = 0.05  # seconds between updates in these tests (1 s in production)


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    """The next event on an SSE stream, as (event name, parsed data); comments are skipped."""
    name = "message"
    data: list[str] = []
    while True:
        raw = await response.content.readline()
        if not raw:
            raise EOFError("stream ended")
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                return name, json.loads("\n".join(data))
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


async def event_where(response: aiohttp.ClientResponse, check, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ANN001
    """Read updates until one satisfies `check`."""
    async with asyncio.timeout(timeout):
        while True:
            _, data = await next_event(response)
            if check(data):
                return data


def open_events(http: aiohttp.ClientSession, url: str):  # noqa: ANN201 - the request context manager
    return http.get(url + "/events", timeout=aiohttp.ClientTimeout(total=None, sock_read=10))


async def test_page_is_served_from_the_package_and_works_offline(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert 'new EventSource("/events")' in page
    # No CDN and no other server: every script and style is inline.
    assert "<script src" not in page and "stylesheet" not in page
    assert "http://" not in page and "https://" not in page
    assert '<link rel="icon" href="data:,">' in page  # no favicon request to turn into a 404
    async with http.post(system.balancer_url + "/") as response:
        assert response.status == 405  # the balancer's own path now, never forwarded
        assert response.headers["Allow"] == "GET,HEAD"


async def test_first_event_is_a_full_snapshot(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with open_events(http, system.balancer_url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        name, snapshot = await next_event(response)
    assert name == "snapshot"
    assert snapshot["health"] == {"status": "ok", "healthy": 2, "serving": 2, "total": 2}
    assert [b["name"] for b in snapshot["backends"]] == ["backend-1", "backend-2"]
    assert snapshot["retiring"] == [] and snapshot["config_error"] is None
    card = snapshot["backends"][0]
    assert {"url", "healthy", "requests", "active_requests", "latency_ms", "last_check_status", "state_since"} <= set(card)
    assert {"admin_state", "listening", "serving", "error_rate", "server_error_rate"} <= set(card)
    # What the page's captions name: the windows behind the figures, and the feed's tick.
    assert snapshot["windows"] == {"latency_samples": 1000, "error_rate_s": 60, "rates_s": 300, "recent_errors": 20}
    assert snapshot["interval_s"] == 1.0
    errors = snapshot["errors"]
    assert errors["error_types"] == {"400_BAD_REQUEST": 0, "404_NOT_FOUND": 0, "500_INTERNAL_ERROR": 0}
    assert errors["recent_errors"] == []
    rates = snapshot["rates"]
    assert len(rates["requests"]) == len(rates["errors"]) == rates["seconds"] == 300


async def test_updates_follow_requests_errors_and_backend_state(make_config, start_system, outside_backend, http) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "backend-1", "port": 0}, {"name": "outside", "url": outside.url}]))
    system.balancer.live_feed.interval = FAST_FEED
    async with open_events(http, system.balancer_url) as stream:
        assert (await next_event(stream))[0] == "snapshot"
        async with http.get(system.balancer_url + "/tasks/31337", headers={"X-Request-ID": "live-404"}) as response:
            assert response.status == 404
        update = await event_where(stream, lambda s: s["errors"]["total_errors"] == 1)
        assert update["errors"]["error_types"]["404_NOT_FOUND"] == 1
        assert update["errors"]["recent_errors"][0]["request_id"] == "live-404"
        assert sum(update["rates"]["errors"]) == 1 and sum(update["rates"]["requests"]) == 1

        await outside.stop()
        down = await event_where(stream, lambda s: not s["backends"][1]["healthy"])
        assert down["health"]["status"] == "degraded"
        assert down["backends"][1]["last_check_status"] == "connection refused"


async def test_a_backend_going_down_is_published_at_once_not_at_the_next_tick(
    make_config, start_system, outside_backend, http
) -> None:
    outside = await outside_backend("outside")
    config = make_config(backends=[{"name": "backend-1", "port": 0}, {"name": "outside", "url": outside.url}], health={"fall": 1})
    system = await start_system(config)
    system.balancer.live_feed.interval = 60.0  # no tick during this test: only the transition can publish
    async with open_events(http, system.balancer_url) as stream:
        assert (await next_event(stream))[0] == "snapshot"
        await outside.stop()
        await system.balancer.health_checker.check_once()
        down = await event_where(stream, lambda s: not s["backends"][1]["healthy"])
    assert down["backends"][1]["last_check_status"] == "connection refused"


@pytest.mark.slow  # waits out real seconds (or a subprocess): the fast tier stays under a minute
async def test_updates_are_at_most_a_second_apart_by_default(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    assert system.balancer.live_feed.interval <= 1.0
    async with open_events(http, system.balancer_url) as stream:
        await next_event(stream)
        started = time.monotonic()
        name, _ = await next_event(stream)
    assert name == "update"
    assert time.monotonic() - started < 1.8  # one interval, with room for a loaded machine


async def test_feed_works_only_while_a_client_listens_and_serves_several(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    feed = system.balancer.live_feed
    feed.interval = FAST_FEED
    assert not feed.publishing and feed.client_count == 0
    async with open_events(http, system.balancer_url) as first, open_events(http, system.balancer_url) as second:
        assert (await next_event(first))[0] == "snapshot"
        assert (await next_event(second))[0] == "snapshot"
        assert feed.publishing and feed.client_count == 2
        assert (await next_event(first))[0] == "update"
        assert (await next_event(second))[0] == "update"
        first.close()  # one dashboard closes: the other keeps its updates
        await wait_for(lambda: feed.client_count == 1, message="the closed client to leave")
        assert (await next_event(second))[0] == "update"
        assert feed.publishing
    await wait_for(lambda: feed.client_count == 0 and not feed.publishing, message="the feed to go idle")


async def test_shutdown_ends_open_streams_and_leaves_no_task(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with open_events(http, system.balancer_url) as stream:
        await next_event(stream)
        started = time.monotonic()
        await system.stop()
        assert time.monotonic() - started < 3  # not held by the open stream
        try:
            while True:
                await next_event(stream)
        except (EOFError, aiohttp.ClientPayloadError):
            pass  # the stream ended
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "live-feed" and not t.done()]


async def test_events_takes_only_get(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    for method in ("POST", "HEAD"):
        async with http.request(method, system.balancer_url + "/events") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET"
