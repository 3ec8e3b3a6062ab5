"""The lb_system benchmark: the balancer against direct access, nginx, HAProxy and a bare
aiohttp forwarder, all in front of the very same hosted backends, in one run.

Usage: python benchmarks/run.py [--long] [--duration 8] [--generator auto|wrk|asyncio] [--no-pin]

Starts benchmarks/server.py (a System from a generated config plus the bare forwarder, in one
process and one event loop), nginx and HAProxy when installed (configs generated, upstream
keep-alive on), then loads `GET /tasks/1` on 127.0.0.1 only, bounded in time:

- throughput and p50/p99 at 32 connections (closed loop), per case;
- 256 connections through the balancer (it must not fail a request);
- latency at one connection, and at a fixed moderate rate (bundled generator, default 500/s),
  and what each proxy adds over direct;
- the system process's RSS; with --long, its growth over a million proxied requests after warm-up.

Prints a table, checks the targets of issue 3, and writes JSON to benchmarks/results/.
On a 2-core machine the system process and the proxies under test share CPU 0 and the load
generator gets CPU 1 (--no-pin leaves placement to the scheduler).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PATH = "/tasks/1"

CASES = ("direct", "balancer", "nginx", "haproxy", "bare", "floor")
MEDIAN_ROUNDS = 3  # from this many rounds on, the throughput targets use the median round
LABELS = {
    "direct": "direct to one backend",
    "balancer": "lb_system balancer",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "bare": "bare aiohttp forwarder",
    "floor": "aiohttp floor (no features)",
}

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --- processes ---------------------------------------------------------------------------


@dataclass
class Placement:
    """Which CPUs the system (and proxies) and the load generator may use; empty: anywhere."""

    system: set[int] = field(default_factory=set)
    load: set[int] = field(default_factory=set)

    @classmethod
    def choose(cls, pin: bool) -> Placement:
        if not pin or not hasattr(os, "sched_setaffinity"):
            return cls()
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls()
        return cls(system={cpus[0]}, load=set(cpus[1:]))

    def describe(self) -> str:
        if not self.system:
            return "not pinned"
        return f"system and proxies on CPU {sorted(self.system)}, load generator on CPU {sorted(self.load)}"


def _pinned(cpus: set[int]):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (nginx's and HAProxy's workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return [pid, *children]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes, all threads included."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_answers(url: str, process: subprocess.Popen, what: str, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode} before answering")
        try:
            status, body = get(url, timeout=1.0)
            if status == 200:
                return body
            last = status
        except OSError as error:
            last = error
        time.sleep(0.05)
    raise SystemExit(f"{what} did not answer {url} with 200 within {timeout}s (last: {last})")


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_system_config(workdir: Path) -> Path:
    path = workdir / "config.toml"
    path.write_text(
        """# Generated by benchmarks/run.py: every feature on, as shipped (access log at INFO).
[balancer]
host = "127.0.0.1"
port = 0

[database]
path = "tasks.db"

[log]
file = "balancer.log"
level = "INFO"

[[backends]]
name = "backend-1"
port = 0

[[backends]]
name = "backend-2"
port = 0
"""
    )
    return path


def nginx_config(workdir: Path, port: int, backends: list[str]) -> Path:
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in backends)
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    path = workdir / "nginx.conf"
    path.write_text(
        f"""# Generated by benchmarks/run.py
{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    keepalive_requests 1000000;
    upstream backends {{
{servers}
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""
    )
    return path


def haproxy_config(workdir: Path, port: int, backends: list[str]) -> Path:
    servers = "\n".join(f"    server b{index} {url.removeprefix('http://')}" for index, url in enumerate(backends, start=1))
    path = workdir / "haproxy.cfg"
    path.write_text(
        f"""# Generated by benchmarks/run.py
global
    nbthread 1
    maxconn 4096
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    default_backend backends

backend backends
    balance roundrobin
{servers}
"""
    )
    return path


# --- load ---------------------------------------------------------------------------------


class Generator:
    """wrk when installed, else the bundled asyncio generator; the same one for every case."""

    def __init__(self, kind: str, workdir: Path, placement: Placement) -> None:
        self.kind = kind
        self.placement = placement
        self.script = workdir / "report.lua"
        self.script.write_text(WRK_REPORT)

    @property
    def name(self) -> str:
        if self.kind == "wrk":
            version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0]
            return version.strip() or "wrk"
        return "bundled asyncio generator (benchmarks/loadgen.py)"

    def closed_loop(self, url: str, connections: int, duration: float, warmup: float) -> dict:
        if self.kind == "wrk":
            if warmup > 0:
                self._wrk(url, connections, warmup)
            return self._wrk(url, connections, duration)
        return self.bundled(url, connections, duration, warmup)

    def _wrk(self, url: str, connections: int, duration: float) -> dict:
        command = [
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
            "-s", str(self.script), url,
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, preexec_fn=_pinned(self.placement.load), timeout=duration + 60
        )
        line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
        raw = json.loads(line)
        seconds = raw["duration_us"] / 1e6
        errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
        return {
            "generator": "wrk",
            "connections": connections,
            "rate": None,
            "seconds": round(seconds, 3),
            "requests": raw["requests"],
            "rps": round(raw["requests"] / seconds, 1),
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
            "errors": errors,
            "non_2xx": raw["status"],
        }

    def bundled(self, url: str, connections: int, duration: float, warmup: float, rate: float | None = None) -> dict:
        command = [
            sys.executable, str(HERE / "loadgen.py"), url, "-c", str(connections),
            "-d", str(duration), "--warmup", str(warmup),
        ]  # fmt: skip
        if rate:
            command += ["--rate", str(rate)]
        done = subprocess.run(
            command, capture_output=True, text=True, preexec_fn=_pinned(self.placement.load), timeout=warmup + duration + 60
        )
        if done.returncode != 0:
            raise SystemExit(f"load generator failed: {done.stderr.strip()}")
        return json.loads(done.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------


@contextlib.contextmanager
def started(command: list[str], placement: Placement, workdir: Path, name: str, **kwargs) -> Iterator[subprocess.Popen]:
    log = open(workdir / f"{name}.out", "wb")
    process = subprocess.Popen(
        command, stdout=kwargs.pop("stdout", log), stderr=log, preexec_fn=_pinned(placement.system), **kwargs
    )
    try:
        yield process
    finally:
        stop(process)
        log.close()


def start_server(workdir: Path, placement: Placement) -> tuple[subprocess.Popen, dict]:
    config = write_system_config(workdir)
    process = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), str(config), "--watch-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(workdir / "server.err", "wb"),
        preexec_fn=_pinned(placement.system),
        cwd=ROOT,
    )
    line = process.stdout.readline() if process.stdout else b""
    if not line:
        process.wait(10)
        raise SystemExit(f"benchmark server did not start:\n{(workdir / 'server.err').read_text()}")
    return process, json.loads(line)


def throughput_rounds(gen: Generator, urls: dict[str, str], pids: dict[str, list[int]], args: argparse.Namespace) -> dict:
    """32 connections, every case once per round, rounds interleaved: a neighbour's load on a
    shared machine then falls on all cases alike instead of on whichever ran at that moment."""
    per_case: dict[str, list[dict]] = {name: [] for name in urls}
    window = args.duration / args.rounds
    for number in range(1, args.rounds + 1):
        print(f"  round {number}/{args.rounds}: {args.connections} connections, {window:g} s per case ...", flush=True)
        for name, url in urls.items():
            if args.warmup > 0:
                gen.closed_loop(url, args.connections, args.warmup, 0)
            before = cpu_seconds(pids[name])
            run = gen.closed_loop(url, args.connections, window, 0)
            run["cpu_s"] = cpu_seconds(pids[name]) - before
            per_case[name].append(run)
    results = {}
    for name, runs in per_case.items():
        requests = sum(r["requests"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        results[name] = {
            "generator": runs[0]["generator"],
            "connections": args.connections,
            "rounds": len(runs),
            "seconds": round(seconds, 3),
            "requests": requests,
            "rps": round(requests / seconds, 1),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p90_ms": statistics.median(r["p90_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "max_ms": max(r["max_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "cpu_us_per_request": round(sum(r["cpu_s"] for r in runs) / max(1, requests) * 1e6, 1),
            "rounds_rps": [r["rps"] for r in runs],
        }
    return results


def latency_case(gen: Generator, name: str, url: str, args: argparse.Namespace) -> dict:
    """One connection (closed loop), and the fixed moderate rate (bundled generator)."""
    result: dict[str, dict] = {}
    print(f"  {LABELS[name]}: 1 connection ...", flush=True)
    result["c1"] = gen.closed_loop(url, 1, args.latency_duration, 0.5)
    if args.rate:
        print(f"  {LABELS[name]}: {args.rate:g} requests/s ...", flush=True)
        result["rate"] = gen.bundled(url, args.rate_connections, args.latency_duration, 0.5, rate=args.rate)
    return result


def long_run(gen: Generator, url: str, pid: int, args: argparse.Namespace) -> dict:
    """RSS after a warm-up, then while a million requests go through the balancer, in chunks."""
    print(f"  warm-up: {args.long_warmup:,} requests through the balancer ...", flush=True)
    warmed = 0
    for _ in range(10):  # bounded even if the balancer answers nothing
        warmed += gen.closed_loop(url, args.connections, 10, 0)["requests"]
        if warmed >= args.long_warmup:
            break
    baseline = rss_kib(pid)
    samples = [{"requests": 0, "rss_kib": baseline}]
    total, errors = 0, 0
    started_at = time.monotonic()
    while total < args.long_requests and time.monotonic() - started_at < args.long_max_seconds:
        chunk = gen.closed_loop(url, args.connections, 30, 0)
        total += chunk["requests"]
        errors += chunk["errors"]
        samples.append({"requests": total, "rss_kib": rss_kib(pid)})
        print(f"    {total:>9,} requests  RSS {samples[-1]['rss_kib'] / 1024:7.1f} MiB", flush=True)
    final = samples[-1]["rss_kib"]
    return {
        "warmup_requests": warmed,
        "requests": total,
        "errors": errors,
        "seconds": round(time.monotonic() - started_at, 1),
        "rss_after_warmup_mib": round(baseline / 1024, 1) if baseline else None,
        "rss_after_mib": round(final / 1024, 1) if final else None,
        "growth_mib": round((final - baseline) / 1024, 2) if baseline and final else None,
        "samples": samples,
    }


def summarize(results: dict) -> dict:
    cases = results["cases"]
    rps = {name: case["c32"]["rps"] for name, case in cases.items()}
    summary: dict[str, object] = {}

    def ratio(a: str, b: str) -> float | None:
        return round(rps[a] / rps[b], 3) if a in rps and b in rps and rps[b] else None

    summary["ratios"] = {
        "balancer/direct": ratio("balancer", "direct"),
        "balancer/nginx": ratio("balancer", "nginx"),
        "balancer/haproxy": ratio("balancer", "haproxy"),
        "balancer/bare": ratio("balancer", "bare"),
        "nginx/direct": ratio("nginx", "direct"),
        "bare/direct": ratio("bare", "direct"),
        "floor/nginx": ratio("floor", "nginx"),
        "floor/bare": ratio("floor", "bare"),
    }
    added: dict[str, dict[str, float]] = {}
    for name, case in cases.items():
        if name == "direct":
            continue
        added[name] = {"c1_p50_ms": round(case["c1"]["p50_ms"] - cases["direct"]["c1"]["p50_ms"], 3)}
        if "rate" in case:
            added[name]["rate_p50_ms"] = round(case["rate"]["p50_ms"] - cases["direct"]["rate"]["p50_ms"], 3)
            added[name]["rate_p99_ms"] = round(case["rate"]["p99_ms"] - cases["direct"]["rate"]["p99_ms"], 3)
    summary["added_latency_ms"] = added
    # The same ratios round by round (each round ran every case back to back).
    per_round: dict[str, list[float]] = {}
    pairs_compared = (
        ("balancer", "direct"),
        ("balancer", "nginx"),
        ("balancer", "haproxy"),
        ("balancer", "bare"),
        ("floor", "nginx"),
        ("floor", "bare"),
    )
    for a, b in pairs_compared:
        if a in cases and b in cases:
            pairs = zip(cases[a]["c32"]["rounds_rps"], cases[b]["c32"]["rounds_rps"])
            per_round[f"{a}/{b}"] = [round(x / y, 3) for x, y in pairs if y]
    summary["ratios_per_round"] = per_round
    # With 3+ rounds the targets use the median round: one round that a neighbour disturbed
    # then moves nothing, while the pooled ratio above moves with it.
    summary["ratios_for_targets"] = {
        key: round(statistics.median(per_round[key]), 3) if len(per_round.get(key, ())) >= MEDIAN_ROUNDS else value
        for key, value in summary["ratios"].items()
    }
    return summary


def check_targets(results: dict) -> list[dict]:
    """Issue 3's targets, as measured in this run."""
    cases, summary = results["cases"], results["summary"]
    ratios, added = summary["ratios_for_targets"], summary["added_latency_ms"]
    checks: list[dict] = []

    def target(name: str, value: object, goal: str, met: bool | None, floor: object = None) -> None:
        # `floor`: the same measure for the aiohttp floor, the best any aiohttp-built proxy can do here.
        checks.append({"target": name, "value": value, "goal": goal, "met": met, "floor": floor})

    if ratios["balancer/nginx"] is not None:
        target(
            "throughput vs nginx", ratios["balancer/nginx"], ">= 0.60", ratios["balancer/nginx"] >= 0.60, ratios["floor/nginx"]
        )
    if ratios["balancer/bare"] is not None:
        target(
            "throughput vs bare forwarder",
            ratios["balancer/bare"],
            ">= 1.30",
            ratios["balancer/bare"] >= 1.30,
            ratios["floor/bare"],
        )
    if "nginx" in added:
        mine, theirs = added["balancer"]["c1_p50_ms"], added["nginx"]["c1_p50_ms"]
        floor = added.get("floor", {}).get("c1_p50_ms")
        target(
            "added latency at 1 connection vs nginx",
            f"{mine:.3f} ms vs {theirs:.3f} ms",
            "<= 1.5 x nginx's",
            mine <= 1.5 * theirs,
            None if floor is None else f"{floor:.3f} ms",
        )
    c32 = cases["balancer"]["c32"]
    target("p99/p50 at 32 connections", round(c32["p99_ms"] / c32["p50_ms"], 2), "<= 3", c32["p99_ms"] <= 3 * c32["p50_ms"])
    high = results.get("balancer_high")
    errors_32 = c32["errors"]
    errors_high = high["errors"] if high else None
    target(
        f"errors at 32 / {high['connections'] if high else '-'} connections",
        f"{errors_32} / {errors_high}",
        "0 / 0",
        errors_32 == 0 and errors_high == 0,
    )
    memory = results.get("memory_long")
    if memory and memory.get("growth_mib") is not None:
        target(
            f"RSS growth over {memory['requests']:,} requests after warm-up",
            f"{memory['growth_mib']} MiB",
            "< 10 MiB per 1M",
            memory["growth_mib"] < 10 * memory["requests"] / 1_000_000,
        )
    return checks


def render(results: dict) -> str:
    cases, summary = results["cases"], results["summary"]
    rate = results["settings"]["rate"]
    lines = [
        f"lb_system benchmark: GET {PATH} ({results['settings']['body_bytes']} bytes), "
        f"{results['settings']['connections']} connections for {results['settings']['duration']:g} s per case "
        f"in {results['settings']['rounds']} interleaved rounds",
        f"generator: {results['machine']['generator']}; server loop: {results['machine']['loop']}; "
        f"{results['machine']['cpus']} CPUs, {results['machine']['placement']}",
        "",
        f"| case | req/s | CPU µs/req | p50 ms | p99 ms | errors | 1 conn p50 ms | added | {rate:g}/s p50 ms | {rate:g}/s p99 ms | added p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, case in cases.items():
        c32, c1, fixed = case["c32"], case["c1"], case.get("rate")
        extra = summary["added_latency_ms"].get(name, {})
        lines.append(
            f"| {LABELS[name]} | {c32['rps']:,.0f} | {c32['cpu_us_per_request']:.0f} | {c32['p50_ms']:.2f} | {c32['p99_ms']:.2f} | {c32['errors']} "
            f"| {c1['p50_ms']:.3f} | {'+%.3f' % extra['c1_p50_ms'] if 'c1_p50_ms' in extra else '-'} "
            f"| {fixed['p50_ms']:.3f} | {fixed['p99_ms']:.3f} "
            f"| {'+%.3f' % extra['rate_p50_ms'] if 'rate_p50_ms' in extra else '-'} |"
            if fixed
            else f"| {LABELS[name]} | {c32['rps']:,.0f} | {c32['cpu_us_per_request']:.0f} | {c32['p50_ms']:.2f} | {c32['p99_ms']:.2f} | {c32['errors']} "
            f"| {c1['p50_ms']:.3f} | {'+%.3f' % extra['c1_p50_ms'] if 'c1_p50_ms' in extra else '-'} | - | - | - |"
        )
    high = results.get("balancer_high")
    if high:
        lines.append(
            f"| lb_system balancer, {high['connections']} conn | {high['rps']:,.0f} | | {high['p50_ms']:.2f} "
            f"| {high['p99_ms']:.2f} | {high['errors']} | | | | | |"
        )
    lines.append("")
    lines.append(
        "CPU µs/req: CPU time of the serving processes (the system process, plus nginx's or HAProxy's) per request "
        "at 32 connections; it moves less than req/s when something else shares the machine."
    )
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items() if v is not None)
    lines.append(f"ratios (req/s): {ratios}")
    rounds = "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in summary["ratios_per_round"].items())
    lines.append(f"per round: {rounds}")
    memory = results["memory"]
    lines.append(
        f"system RSS: {memory['start_mib']} MiB at start, {memory['end_mib']} MiB after "
        f"{memory['requests_served']:,} requests of this run"
    )
    long = results.get("memory_long")
    if long:
        lines.append(
            f"long run: RSS {long['rss_after_warmup_mib']} MiB after {long['warmup_requests']:,} warm-up requests, "
            f"{long['rss_after_mib']} MiB after {long['requests']:,} more ({long['growth_mib']:+} MiB, "
            f"{long['errors']} errors, {long['seconds']} s)"
        )
    lines.append("")
    median = results["settings"]["rounds"] >= MEDIAN_ROUNDS
    lines.append(f"targets (issue 3; throughput ratios {'of the median round' if median else 'over all rounds'}):")
    for check in results["targets"]:
        mark = "met" if check["met"] else "NOT met"
        floor = "" if check.get("floor") is None else f"; the aiohttp floor: {check['floor']}"
        lines.append(f"  {mark:8} {check['target']}: {check['value']} (goal {check['goal']}{floor})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=9.0, help="measured seconds per case at 32 connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the --duration is split into")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured window")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="seconds at 1 connection and at --rate")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--high-connections", type=int, default=256, help="the balancer's overload check")
    parser.add_argument("--rate", type=float, default=500.0, help="fixed rate for the added-latency check (0: skip)")
    parser.add_argument("--rate-connections", type=int, default=8)
    parser.add_argument("--generator", choices=("auto", "wrk", "asyncio"), default="auto")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--no-pin", action="store_true", help="do not pin the system and the generator to CPUs")
    parser.add_argument("--long", action="store_true", help="also measure RSS growth over --long-requests (minutes)")
    parser.add_argument("--long-requests", type=int, default=1_000_000)
    parser.add_argument("--long-warmup", type=int, default=100_000)
    parser.add_argument("--long-max-seconds", type=float, default=1800, help="stop the long run after this long anyway")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default: benchmarks/results/)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    args = parser.parse_args(argv)

    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(wanted) - set(CASES)
    if unknown or not {"direct", "balancer"} <= set(wanted):
        parser.error(f"--cases must include direct and balancer, from {', '.join(CASES)}")
    kind = args.generator
    if kind == "auto":
        kind = "wrk" if shutil.which("wrk") else "asyncio"
    elif kind == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed")
    placement = Placement.choose(not args.no_pin)

    workdir = Path(tempfile.mkdtemp(prefix="lb-bench-"))
    gen = Generator(kind, workdir, placement)
    served = 0
    try:
        server, ready = start_server(workdir, placement)
        try:
            backends = list(ready["backends"].values())
            urls = {
                "direct": backends[0] + PATH,
                "balancer": ready["balancer"] + PATH,
                "bare": ready["bare"] + PATH,
                "floor": ready["floor"] + PATH,
            }
            expected = wait_until_answers(urls["direct"], server, "benchmark server")
            rss_start = rss_kib(server.pid)
            proxies: dict[str, subprocess.Popen] = {}
            with contextlib.ExitStack() as stack:
                if "nginx" in wanted and shutil.which("nginx"):
                    port = free_port()
                    for sub in ("nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"):
                        (workdir / sub).mkdir()
                    conf = nginx_config(workdir, port, backends)
                    nginx = stack.enter_context(
                        started(["nginx", "-c", str(conf), "-p", str(workdir)], placement, workdir, "nginx")
                    )
                    urls["nginx"] = f"http://127.0.0.1:{port}{PATH}"
                    proxies["nginx"] = nginx
                    wait_until_answers(urls["nginx"], nginx, "nginx")
                if "haproxy" in wanted and shutil.which("haproxy"):
                    port = free_port()
                    conf = haproxy_config(workdir, port, backends)
                    haproxy = stack.enter_context(started(["haproxy", "-f", str(conf)], placement, workdir, "haproxy"))
                    urls["haproxy"] = f"http://127.0.0.1:{port}{PATH}"
                    proxies["haproxy"] = haproxy
                    wait_until_answers(urls["haproxy"], haproxy, "haproxy")

                for name, url in urls.items():
                    status, body = get(url)
                    if status != 200 or len(body) != len(expected):
                        raise SystemExit(f"{name} answers {status} with {len(body)} bytes, expected 200 with {len(expected)}")

                results: dict = {
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                        "loop": ready["loop"],
                        "generator": gen.name,
                        "placement": placement.describe(),
                    },
                    "settings": {
                        "path": PATH,
                        "body_bytes": len(expected),
                        "connections": args.connections,
                        "duration": args.duration,
                        "rounds": args.rounds,
                        "warmup": args.warmup,
                        "latency_duration": args.latency_duration,
                        "rate": args.rate,
                        "rate_connections": args.rate_connections,
                    },
                    "cases": {},
                }
                print(f"benchmark: {results['machine']['generator']}, server loop {ready['loop']}, {placement.describe()}")
                pids = {name: [server.pid] for name in urls}
                for name, process in proxies.items():
                    pids[name] += process_tree(process.pid)
                measured = {name: urls[name] for name in CASES if name in urls and name in wanted}
                for name, c32 in throughput_rounds(gen, measured, pids, args).items():
                    results["cases"][name] = {"c32": c32}
                for name, url in measured.items():
                    results["cases"][name].update(latency_case(gen, name, url, args))
                    served += sum(part["requests"] for part in results["cases"][name].values())
                print(f"  {LABELS['balancer']}: {args.high_connections} connections ...", flush=True)
                results["balancer_high"] = gen.closed_loop(urls["balancer"], args.high_connections, 5, args.warmup)
                served += results["balancer_high"]["requests"]
                results["memory"] = {
                    "start_mib": round(rss_start / 1024, 1) if rss_start else None,
                    "end_mib": round((rss_kib(server.pid) or 0) / 1024, 1),
                    "requests_served": served,
                }
                if args.long:
                    results["memory_long"] = long_run(gen, urls["balancer"], server.pid, args)
        finally:
            stop(server)
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results["summary"] = summarize(results)
    results["targets"] = check_targets(results)
    table = render(results)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    destination = args.json or RESULTS / f"bench-{stamp}.json"
    destination.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.txt").write_text(table + "\n")
    print(f"\nJSON: {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
