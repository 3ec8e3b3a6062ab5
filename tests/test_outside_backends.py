"""What a user of outside backends meets: loops and duplicates refused, a URL's path as a
prefix, and no task API (nor its database) when no backend is hosted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb_system import ConfigError, parse_config


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"backends": [{"name": "a", "url": "http://127.0.0.1:8080"}]},
            "[[backends]] #1 (a) url: http://127.0.0.1:8080 is the balancer's own [balancer] port",
        ),
        ({"backends": [{"name": "a", "url": "http://localhost:8080/x"}]}, "is the balancer's own [balancer] port"),
        (
            {"control": {"port": 8081}, "backends": [{"name": "a", "url": "http://127.0.0.1:8081"}]},
            "is the balancer's own [control] port",
        ),
        (
            {"backends": [{"name": "a", "url": "http://10.0.0.5:9101"}, {"name": "b", "url": "http://10.0.0.5:9101/"}]},
            "[[backends]] #2 (b) url: the same server as backend 'a'",
        ),
        (
            {"backends": [{"name": "a", "url": "http://EXAMPLE.com"}, {"name": "b", "url": "http://example.com:80"}]},
            "[[backends]] #2 (b) url: the same server as backend 'a'",
        ),
        (
            {"backends": [{"name": "a", "port": 5001}, {"name": "b", "url": "http://localhost:5001"}]},
            "[[backends]] #2 (b) url: the same server as backend 'a'",
        ),
    ],
)
def test_check_refuses_a_backend_that_is_the_balancer_itself_or_a_duplicate(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_other_paths_and_hosts_on_the_same_port_are_other_servers() -> None:
    config = parse_config(
        {
            "backends": [
                {"name": "a", "url": "http://10.0.0.5:9101/shop"},
                {"name": "b", "url": "http://10.0.0.5:9101/blog"},
                {"name": "c", "url": "http://10.0.0.6:8080"},
            ]
        }
    )
    assert [b.name for b in config.backends] == ["a", "b", "c"]


async def test_a_backend_url_path_is_a_prefix_for_every_proxied_path_and_for_checks(
    make_config, start_system, outside_backend, http
) -> None:
    shop = await outside_backend("shop", misbehaves=False)  # echoes every path but /health
    system = await start_system(make_config(backends=[{"name": "shop", "url": shop.url + "/shop"}]))
    # Its first check went to /shop/health (an echoed hit; /health itself is not counted).
    assert system.pool.get("shop").healthy and shop.hits >= 1
    async with http.get(system.balancer_url + "/items?x=1") as response:
        assert response.status == 200 and (await response.json())["path"] == "/shop/items?x=1"


async def test_without_hosted_backends_there_is_no_task_api_and_no_database(
    make_config, start_system, outside_backend, http, tmp_path: Path
) -> None:
    app = await outside_backend("app", misbehaves=False)
    system = await start_system(make_config(backends=[{"name": "app", "url": app.url}]))
    async with http.get(system.balancer_url + "/openapi.json") as response:
        document = await response.json()
    assert not any(path.startswith("/tasks") for path in document["paths"])
    assert "/status" in document["paths"]
    assert not (tmp_path / "tasks.db").exists()


async def test_with_hosted_backends_the_task_api_is_listed(make_config, start_system, http, tmp_path: Path) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/openapi.json") as response:
        assert "/tasks" in (await response.json())["paths"]
    assert (tmp_path / "tasks.db").exists()


async def test_request_and_response_bytes_are_counted_by_backend(make_config, start_system, outside_backend, http) -> None:
    store = await outside_backend("store")
    system = await start_system(make_config(backends=[{"name": "store", "url": store.url}]))
    url = system.balancer_url
    small_upload, large_upload, large_download = 1000, 300 * 1024, 700 * 1024  # below and above the 256 KiB buffer
    answers = 0
    for size in (small_upload, large_upload):
        async with http.post(url + "/upload", data=b"u" * size) as response:
            assert (await response.json())["received"] == size
            answers += int(response.headers["Content-Length"])
    async with http.get(url + f"/download?bytes={large_download}&chunked=1") as response:
        assert len(await response.read()) == large_download
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    assert f'lb_request_bytes_total{{backend="store"}} {float(small_upload + large_upload)}' in text
    assert f'lb_response_bytes_total{{backend="store"}} {float(answers + large_download)}' in text
