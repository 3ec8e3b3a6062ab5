"""deploy/prometheus/: the Prometheus config and rules shipped for a fleet of balancers. promtool
checks the config and the rules and runs their unit tests; the rules name only metrics that
/metrics really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULE_FILES = ("lb_recording_rules.yml", "lb_alerting_rules.yml")


def promtool(*args: str) -> str:
    """Run promtool in deploy/prometheus/; its output, or the test fails with it."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus); .ci/run installs it")
    done = subprocess.run([tool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_promtool_finds_the_config_valid() -> None:
    assert "SUCCESS: 2 rule files found" in promtool("check", "config", "prometheus.yml")


@pytest.mark.slow
def test_promtool_finds_the_rules_valid() -> None:
    promtool("check", "rules", *RULE_FILES)


@pytest.mark.slow
def test_the_rules_unit_tests_pass() -> None:
    # Series in, recorded samples and alerts out (deploy/prometheus/tests/).
    tests = sorted(path.name for path in (DEPLOY / "tests").glob("*.yml"))
    assert tests
    assert "SUCCESS" in promtool("test", "rules", *(f"tests/{name}" for name in tests))


def rules() -> list[dict]:
    found = []
    for name in RULE_FILES:
        for group in yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))["groups"]:
            found += group["rules"]
    return found


async def test_the_rules_name_only_metrics_that_metrics_exports(make_config, start_system, http) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/tasks/999999") as response:  # a request and an error: every series exists
        assert response.status == 404
    async with http.get(system.balancer_url + "/metrics") as response:
        exported = {sample.name for family in text_string_to_metric_families(await response.text()) for sample in family.samples}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    exprs = [re.sub(r'"[^"]*"', '""', rule["expr"]) for rule in rules()]  # label values are not metric names
    used = {name for expr in exprs for name in re.findall(r"\b[a-z_]+:[a-z0-9_:]+|\blb_[a-z_]+", expr)}
    assert used - recorded - exported == set()
    assert {"lb_errors_total", "lb_requests_total", "lb_request_duration_seconds_bucket", "lb_backend_serving"} <= used


def test_the_rules_watch_the_job_prometheus_scrapes() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    selectors = {job for rule in rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert selectors and selectors <= jobs
    assert set(config["rule_files"]) == set(RULE_FILES)


def readme_error_table() -> dict[str, list[str]]:
    """README's cluster-wide error table: each row's `/errors/stats` fields -> the PromQL queries it gives."""
    lines = (DEPLOY.parent.parent / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| `/errors/stats` field | PromQL across instances |") + 2
    table: dict[str, list[str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        field, queries = (cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:3])
        # A query names a metric (`[5m]`-only spans and prose are not queries); `\|` is markdown's escape.
        table[field] = [q.replace("\\|", "|") for q in re.findall(r"`([^`]+)`", queries) if re.search(r"[a-z_]+\{", q)]
    return table


async def test_the_readme_error_table_gives_every_stats_field_a_row_and_queries_exported_metrics(
    make_config, start_system, http
) -> None:
    system = await start_system(make_config())
    async with http.get(system.balancer_url + "/tasks/999999") as response:  # an error: every series exists
        assert response.status == 404
    async with http.get(system.balancer_url + "/errors/stats") as response:
        fields = set(await response.json())
    async with http.get(system.balancer_url + "/metrics") as response:
        exported = {sample.name for family in text_string_to_metric_families(await response.text()) for sample in family.samples}
    table = readme_error_table()
    named = {name for row in table for name in re.findall(r"`([a-z_0-9]+)`", row)}
    assert fields - named == set(), "fields of /errors/stats without a row in the README's table"
    queries = [query for row in table.values() for query in row]
    used = {name for query in queries for name in re.findall(r"\b([a-z_]+)\{", query)}
    assert len(queries) >= 8 and used - exported - {"up"} == set()


@pytest.mark.slow
def test_promtool_parses_every_query_of_the_readme_error_table(tmp_path: Path) -> None:
    queries = [query for row in readme_error_table().values() for query in row]
    groups = [{"name": "readme", "rules": [{"record": f"readme:query{i}", "expr": q} for i, q in enumerate(queries)]}]
    rule_file = tmp_path / "readme_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    assert f"SUCCESS: {len(queries)} rules found" in promtool("check", "rules", str(rule_file))
