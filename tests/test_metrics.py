"""GET /metrics over real sockets: parsed with prometheus_client's own parser and checked
against /errors/stats and /status after known sequences of requests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.waiting import wait_for

from lb_system.balancing.events import ProxiedRequest
from lb_system.balancing.pool import Backend, BackendPool
from lb_system.config import HealthConfig
from lb_system.observability.error_tracker import ErrorTracker
from lb_system.observability.metrics import Metrics

# Health checks only at start-up: the counts stay put while a test compares them.
QUIET_HEALTH = {"interval": 3600, "rise": 1, "fall": 1}
ALLOWED_LABELS = {"backend", "method", "code", "result", "to", "type", "le", "state"}


class Scrape:
    """One parsed exposition: samples by name, each a (labels, value) list."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        matches = [v for found, v in self.samples.get(name, []) if all(found.get(k) == x for k, x in labels.items())]
        return sum(matches)

    def by(self, name: str, label: str) -> dict[str, float]:
        totals: defaultdict[str, float] = defaultdict(float)
        for found, value in self.samples.get(name, []):
            totals[found[label]] += value
        return {k: v for k, v in totals.items() if v}


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await response.text())


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def test_metrics_agree_with_errors_stats_and_status_after_a_known_sequence(make_config, start_system, http) -> None:
    system = await start_system(make_config(health=QUIET_HEALTH))
    url = system.balancer_url
    sent: Counter[int] = Counter()
    for path in ["/tasks"] * 4 + ["/tasks/999001", "/tasks/999002", "/tasks/999003", "/debug/crash"]:
        async with http.get(url + path) as response:
            sent[response.status] += 1
    async with http.post(url + "/tasks", data=b"", headers={"Content-Type": "application/json"}) as response:
        sent[response.status] += 1
    assert sent == {200: 4, 404: 3, 500: 1, 400: 1}
    async with http.post(url + "/metrics") as response:  # the balancer's own 405, not proxied
        assert response.status == 405
        sent[405] += 1  # counted in lb_requests_total too, as the balancer's answer
    direct = system.hosted["backend-1"].url
    async with http.get(direct + "/tasks/424242") as response:  # an error that skips the balancer
        assert response.status == 404

    before = await get_json(http, url + "/status")
    metrics = await scrape(http, url)
    stats = await get_json(http, url + "/errors/stats")
    status = await get_json(http, url + "/status")

    # lb_errors_total is /errors/stats, cut by server and type.
    assert metrics.value("lb_errors_total") == stats["total_errors"] == 7
    assert metrics.by("lb_errors_total", "type") == {t: n for t, n in stats["error_types"].items() if n}
    assert metrics.by("lb_errors_total", "backend") == stats["by_server"]
    # code as lb_requests_total spells it; the 4th 404 went straight to backend-1.
    assert metrics.by("lb_errors_total", "code") == {"404": 4, "500": 1, "400": 1, "405": 1}
    assert metrics.value("lb_errors_total", backend="balancer", code="405", type="405_METHOD_NOT_ALLOWED") == 1

    # lb_requests_total: every proxied request, and the balancer's own error answer, once by exact code;
    # per backend as /status counts.
    assert metrics.by("lb_requests_total", "code") == {str(code): n for code, n in sent.items()}
    for backend, earlier in zip(status["backends"], before["backends"]):
        name = backend["name"]
        assert metrics.value("lb_requests_total", backend=name) == backend["requests"] > 0
        assert metrics.value("lb_request_duration_seconds_count", backend=name) == backend["requests"]
        assert metrics.value("lb_backend_up", backend=name) == (1.0 if backend["healthy"] else 0.0)
        assert metrics.value("lb_backend_active_requests", backend=name) == backend["active_requests"] == 0
        # A check may land between two reads; each read of /status brackets the scrape.
        checks = metrics.value("lb_health_checks_total", backend=name, result="ok")
        assert 1 <= earlier["checks_ok"] <= checks <= backend["checks_ok"]
        assert metrics.value("lb_health_checks_total", backend=name, result="failed") == backend["checks_failed"] == 0
        assert metrics.value("lb_health_check_duration_seconds_count", backend=name) == checks
        assert metrics.value("lb_backend_transitions_total", backend=name, to="up") == len(backend["transitions"]) == 1
        assert metrics.value("lb_retries_total", backend=name) == 0
        assert metrics.value("lb_backend_ejections_total", backend=name) == backend["ejections"] == 0
    assert metrics.value("lb_no_backend_total") == 0


async def test_metric_names_types_buckets_and_labels_follow_the_contract(make_config, start_system, http) -> None:
    system = await start_system(make_config(health=QUIET_HEALTH))
    async with http.request("PROPFIND", system.balancer_url + "/tasks") as response:
        assert response.status == 405
    async with http.get(system.balancer_url + "/tasks/1?secret=abc") as response:
        assert response.status == 404
    metrics = await scrape(http, system.balancer_url)
    types = {name: f.type for name, f in metrics.families.items() if name.startswith("lb_")}
    assert types == {
        "lb_requests": "counter",
        "lb_request_duration_seconds": "histogram",
        "lb_request_bytes": "counter",
        "lb_response_bytes": "counter",
        "lb_backend_up": "gauge",
        "lb_backend_serving": "gauge",
        "lb_backend_admin_state": "gauge",
        "lb_backend_active_requests": "gauge",
        "lb_backend_ejections": "counter",
        "lb_health_checks": "counter",
        "lb_health_check_duration_seconds": "histogram",
        "lb_backend_transitions": "counter",
        "lb_errors": "counter",
        "lb_retries": "counter",
        "lb_no_backend": "counter",
    }
    buckets = sorted({float(labels["le"]) for labels, _ in metrics.samples["lb_request_duration_seconds_bucket"]})
    assert buckets[0] == 0.005 and buckets[-2] == 10.0 and buckets[-1] == float("inf")
    # Low cardinality: no path, id or query ever becomes a label; unknown methods fold into OTHER.
    for name, samples in metrics.samples.items():
        if not name.startswith("lb_"):
            continue
        for labels, _ in samples:
            assert set(labels) <= ALLOWED_LABELS, (name, labels)
            assert not any("/" in value or "secret" in value for value in labels.values())
    assert metrics.value("lb_requests_total", method="OTHER", code="405") == 1


async def test_no_backend_transitions_and_checks_are_counted(make_config, start_system, outside_backend, http) -> None:
    outside = await outside_backend("outside")
    system = await start_system(make_config(backends=[{"name": "outside", "url": outside.url}]))
    await outside.stop()
    await wait_for(lambda: not system.pool.backends[0].healthy, message="the outside backend to go down")
    async with http.get(system.balancer_url + "/anything") as response:
        assert response.status == 503
    metrics = await scrape(http, system.balancer_url)
    status = await get_json(http, system.balancer_url + "/status")
    backend = status["backends"][0]
    assert metrics.value("lb_no_backend_total") == 1
    assert metrics.value("lb_requests_total", backend="balancer", code="503") == 1
    assert metrics.value("lb_backend_up", backend="outside") == 0
    assert metrics.value("lb_backend_transitions_total", backend="outside", to="down") == 1
    assert metrics.value("lb_backend_transitions_total", backend="outside", to="up") == 1
    # Checks keep running between the two reads: the scrape came first, so it can only be behind.
    assert 1 <= metrics.value("lb_health_checks_total", backend="outside", result="failed") <= backend["checks_failed"]
    assert metrics.value("lb_errors_total", backend="balancer", code="503", type="503_SERVICE_UNAVAILABLE") == 1


@contextlib.asynccontextmanager
async def hang_up_server() -> AsyncIterator[str]:
    """Passes health checks, but hangs up on every other request before answering."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_retries_are_counted_on_the_backend_that_failed(make_config, start_system, outside_backend, http) -> None:
    alive = await outside_backend("alive")
    async with hang_up_server() as flaky_url:
        system = await start_system(
            make_config(backends=[{"name": "alive", "url": alive.url}, {"name": "flaky", "url": flaky_url}], health=QUIET_HEALTH)
        )
        for _ in range(2):  # round robin: one of the two goes to flaky first
            async with http.get(system.balancer_url + "/thing") as response:
                assert response.status == 200
                assert response.headers["X-Backend"] == "alive"
        metrics = await scrape(http, system.balancer_url)
        await system.stop()
    assert metrics.value("lb_retries_total", backend="flaky") == 1
    assert metrics.value("lb_retries_total", backend="alive") == 0
    assert metrics.value("lb_requests_total", backend="alive", code="200") == 2
    assert metrics.value("lb_requests_total", backend="flaky") == 0


async def test_each_system_has_its_own_registry(make_config, start_system, http) -> None:
    first = await start_system(make_config(health=QUIET_HEALTH, database={"path": "one.db"}, log={"file": "one.log"}))
    second = await start_system(make_config(health=QUIET_HEALTH, database={"path": "two.db"}, log={"file": "two.log"}))
    for _ in range(3):
        async with http.get(first.balancer_url + "/tasks") as response:
            assert response.status == 200
    assert (await scrape(http, first.balancer_url)).value("lb_requests_total") == 3
    assert (await scrape(http, second.balancer_url)).value("lb_requests_total") == 0


async def test_answers_the_balancer_gives_itself_are_counted_under_balancer(make_config, start_system, http) -> None:
    system = await start_system(make_config(health=QUIET_HEALTH, proxy={"max_body_bytes": 10}))
    async with http.post(system.balancer_url + "/tasks", data=b"x" * 100) as response:
        assert response.status == 413
    metrics = await scrape(http, system.balancer_url)
    assert metrics.value("lb_requests_total", backend="balancer", method="POST", code="413") == 1
    assert metrics.value("lb_errors_total", backend="balancer", code="413", type="413_REQUEST_ENTITY_TOO_LARGE") == 1
    assert metrics.value("lb_no_backend_total") == 0


async def test_no_created_series_and_the_process_platform_and_gc_collectors(make_config, start_system, http) -> None:
    system = await start_system(make_config(health=QUIET_HEALTH))
    async with http.get(system.balancer_url + "/tasks") as response:
        assert response.status == 200
    async with http.get(system.balancer_url + "/metrics") as response:
        text = await response.text()
    assert "_created" not in text
    metrics = Scrape(text)
    assert metrics.value("lb_requests_total") == 1
    assert metrics.value("python_info") == 1
    assert metrics.value("python_gc_collections_total") >= 0 and "python_gc_objects_collected_total" in metrics.samples
    if sys.platform.startswith("linux"):  # prometheus_client reads /proc
        assert metrics.value("process_cpu_seconds_total") > 0
        assert metrics.value("process_resident_memory_bytes") > 0
        assert metrics.value("process_open_fds") > 0


async def test_serving_and_admin_state_follow_the_admin_api(make_config, start_system, http, monkeypatch) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", "metrics-test-token")
    auth = {"Authorization": "Bearer metrics-test-token"}
    system = await start_system(make_config(health=QUIET_HEALTH))
    url = system.balancer_url

    def admin_states(metrics: Scrape, backend: str) -> dict[str, float]:
        return {labels["state"]: v for labels, v in metrics.samples["lb_backend_admin_state"] if labels["backend"] == backend}

    metrics = await scrape(http, url)
    for name in ("backend-1", "backend-2"):
        assert metrics.value("lb_backend_serving", backend=name) == 1
        assert admin_states(metrics, name) == {"enabled": 1, "disabled": 0, "draining": 0}
    for name, action in (("backend-1", "disable"), ("backend-2", "drain")):
        async with http.post(f"{url}/admin/backends/{name}/{action}", headers=auth) as response:
            assert response.status == 200
    metrics = await scrape(http, url)
    assert admin_states(metrics, "backend-1") == {"enabled": 0, "disabled": 1, "draining": 0}
    assert admin_states(metrics, "backend-2") == {"enabled": 0, "disabled": 0, "draining": 1}
    for name in ("backend-1", "backend-2"):
        assert metrics.value("lb_backend_up", backend=name) == 1  # still passing checks...
        assert metrics.value("lb_backend_serving", backend=name) == 0  # ...but getting no request


async def test_deleting_error_stats_leaves_lb_errors_total_monotonic(make_config, start_system, http, monkeypatch) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", "metrics-test-token")
    system = await start_system(make_config(health=QUIET_HEALTH))
    url = system.balancer_url
    for _ in range(2):
        async with http.get(url + "/tasks/999999") as response:
            assert response.status == 404
    async with http.delete(url + "/errors/stats", headers={"Authorization": "Bearer metrics-test-token"}) as response:
        assert response.status == 200
    assert (await get_json(http, url + "/errors/stats"))["total_errors"] == 0
    assert (await scrape(http, url)).value("lb_errors_total", code="404") == 2
    async with http.get(url + "/tasks/999999") as response:
        assert response.status == 404
    assert (await scrape(http, url)).value("lb_errors_total", code="404") == 3


@pytest.mark.slow
async def test_promtool_finds_the_exposition_clean(make_config, start_system, http) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus); .ci/run installs it")
    system = await start_system(make_config(health=QUIET_HEALTH))
    for path in ("/tasks", "/tasks/999999", "/debug/crash"):
        async with http.get(system.balancer_url + path) as response:
            await response.read()
    async with http.get(system.balancer_url + "/metrics") as response:
        exposition = await response.read()
    pipe = asyncio.subprocess.PIPE
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=pipe, stdout=pipe, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(exposition), 30)
    assert process.returncode == 0 and not output.strip(), output.decode()


def test_request_durations_land_in_the_buckets_prometheus_would_put_them_in() -> None:
    # Counted by our own code on the hot path: the histogram must still read as prometheus_client's.
    pool = BackendPool([Backend("backend-1", "http://127.0.0.1:1", hosted=False)], health=HealthConfig())
    metrics = Metrics(pool, ErrorTracker(10))
    for seconds in (0.001, 0.005, 0.0051, 0.3, 12.0):  # 0.005 sits on a bound: `le` counts it there
        metrics.on_request(ProxiedRequest("GET", 200, "backend-1", seconds, ()))
    metrics.on_request(ProxiedRequest("BREW", 503, "balancer", 0.02, (), no_backend=True))
    scraped = Scrape(metrics.exposition().decode())
    buckets = {
        labels["le"]: value
        for labels, value in scraped.samples["lb_request_duration_seconds_bucket"]
        if labels["backend"] == "backend-1"
    }
    assert (buckets["0.005"], buckets["0.01"], buckets["0.25"], buckets["0.5"], buckets["10.0"], buckets["+Inf"]) == (
        2,
        3,
        3,
        4,
        4,
        5,
    )
    assert scraped.value("lb_request_duration_seconds_count", backend="backend-1") == 5
    assert scraped.value("lb_request_duration_seconds_sum", backend="backend-1") == pytest.approx(12.3111)
    assert scraped.value("lb_requests_total", backend="backend-1", method="GET", code="200") == 5
    assert scraped.value("lb_requests_total", backend="balancer", method="OTHER", code="503") == 1
    assert scraped.value("lb_no_backend_total") == 1
