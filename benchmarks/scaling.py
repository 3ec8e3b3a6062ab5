"""`python benchmarks/run.py --processes N`: throughput on more cores.

The balancer runs as 1, 2, ... N processes on one port (`python run.py --role balancer
--processes n`, `[balancer] reuse_port = true`), beside nginx at 1, 2, ... N workers, all in front
of the same two task-API backends, each in a process of its own (`python run.py --role
backends`). Cases are measured in interleaved rounds (32 connections, `GET /tasks/1`), so a
neighbour's load falls on all of them alike. Nothing is pinned: the point is to let the kernel
spread processes over every core. The load generator, the backends and the proxy under test share
the machine's cores, so on a small machine the proxies' scaling is capped by what is left to them.

Prints a table and the ratios (n processes / 1 process, lb_system / nginx at each n), writes JSON
to benchmarks/results/scaling-*.json and the table to benchmarks/results/latest-scaling.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import (
    PATH,
    ROOT,
    Generator,
    Placement,
    free_port,
    get,
    nginx_config,
    process_tree,
    save_results,
    started,
    throughput_rounds,
    wait_until_answers,
)

RUN = ROOT / "run.py"
SEED_TASK = b'{"title": "benchmark task", "description": "the task every benchmark request reads"}'


def backend_config(workdir: Path, name: str, port: int) -> Path:
    """One hosted backend (`--role backends`); every backend shares tasks.db."""
    path = workdir / f"{name}.toml"
    path.write_text(
        f'[database]\npath = "tasks.db"\n[log]\nfile = "{name}.log"\nlevel = "INFO"\n'
        f'[[backends]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return path


def balancer_config(workdir: Path, processes: int, port: int, backends: list[str]) -> Path:
    """The balancer as shipped (access log at INFO), its backends by url, one log file per process."""
    path = workdir / f"lb-{processes}.toml"
    listed = "".join(f'[[backends]]\nname = "backend-{i}"\nurl = "{url}"\n' for i, url in enumerate(backends, start=1))
    path.write_text(
        f'[balancer]\nhost = "127.0.0.1"\nport = {port}\nreuse_port = true\n'
        f'[log]\nfile = "lb-{processes}-{{pid}}.log"\nlevel = "INFO"\n' + listed
    )
    return path


def post(url: str, body: bytes) -> int:
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


def wait_for_instances(url: str, process: subprocess.Popen, count: int, timeout: float = 30.0) -> set[int]:
    """Until `count` distinct processes have answered /status on the shared port (a new connection each time)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < count:
        if process.poll() is not None:
            raise SystemExit(f"the balancer group exited with status {process.returncode}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            status, body = get(url + "/status", timeout=1.0)
            if status == 200:
                seen.add(json.loads(body)["instance"]["pid"])
                continue
        time.sleep(0.05)
    if len(seen) < count:
        raise SystemExit(f"only {len(seen)} of {count} balancer processes answered {url} within {timeout}s")
    return seen


def label(name: str) -> str:
    kind, n = name.rsplit("-", 1)
    if kind == "direct":
        return "direct to one backend"
    plural = "" if n == "1" else "es" if kind == "lb" else "s"
    return f"lb_system balancer, {n} process{plural}" if kind == "lb" else f"nginx, {n} worker{plural}"


def compared(processes: int) -> list[tuple[str, str]]:
    """n processes against one, and lb_system against nginx at each n."""
    pairs = [(f"{kind}-{n}", f"{kind}-1") for n in range(2, processes + 1) for kind in ("lb", "nginx")]
    return pairs + [(f"lb-{n}", f"nginx-{n}") for n in range(1, processes + 1)]


def summarize(cases: dict[str, dict], processes: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The req/s ratios over all rounds, and round by round (each round ran every case back to back)."""
    pairs = [(a, b) for a, b in compared(processes) if a in cases and b in cases]
    ratios = {f"{a}/{b}": round(cases[a]["rps"] / cases[b]["rps"], 3) for a, b in pairs}
    per_round = {
        f"{a}/{b}": [round(x / y, 3) for x, y in zip(cases[a]["rounds_rps"], cases[b]["rounds_rps"], strict=True)]
        for a, b in pairs
    }
    return ratios, per_round


def render(results: dict) -> str:
    settings, machine = results["settings"], results["machine"]
    lines = [
        f"lb_system on more cores: GET {PATH}, {settings['connections']} connections for {settings['duration']:g} s per case "
        f"in {settings['rounds']} interleaved rounds",
        f"generator: {machine['generator']}; {machine['cpus']} CPUs, not pinned; backends: 2 x `run.py --role backends`",
        "",
        "| case | req/s | CPU µs/req | p50 ms | p99 ms | errors | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, case in results["cases"].items():
        rounds = ", ".join(f"{rps:,.0f}" for rps in case["rounds_rps"])
        cpu = "-" if name.startswith("direct") else f"{case['cpu_us_per_request']:.0f}"  # the backend's CPU is not counted
        lines.append(
            f"| {label(name)} | {case['rps']:,.0f} | {cpu} | {case['p50_ms']:.2f} "
            f"| {case['p99_ms']:.2f} | {case['errors']} | {rounds} |"
        )
    lines.append("")
    lines.append("CPU µs/req: the proxy's own processes (all of its workers), not the backends' nor the generator's.")
    lines.append("ratios (req/s): " + ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items()))
    rounds = "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in results["ratios_per_round"].items())
    lines.append(f"per round: {rounds}")
    return "\n".join(lines)


def run_scaling(args: argparse.Namespace) -> int:
    """The --processes run; `args` as benchmarks/run.py parsed them."""
    kind = args.generator
    if kind == "auto":
        kind = "wrk" if shutil.which("wrk") else "asyncio"
    placement = Placement()  # not pinned: the kernel spreads the processes over every core
    workdir = Path(tempfile.mkdtemp(prefix="lb-scaling-"))
    gen = Generator(kind, workdir, placement)
    counts = range(1, args.processes + 1)
    try:
        with contextlib.ExitStack() as stack:
            backends: list[str] = []
            for index in (1, 2):
                name, port = f"backend-{index}", free_port()
                config = backend_config(workdir, name, port)
                command = [sys.executable, str(RUN), "--role", "backends", "--config", str(config)]
                process = stack.enter_context(started(command, placement, workdir, name, cwd=workdir))
                backends.append(f"http://127.0.0.1:{port}")
                wait_until_answers(backends[-1] + "/health", process, name)
            post(backends[0] + "/tasks", SEED_TASK)
            urls = {"direct-1": backends[0] + PATH}
            groups: dict[str, subprocess.Popen] = {}
            for n in counts:
                port = free_port()
                config = balancer_config(workdir, n, port, backends)
                command = [sys.executable, str(RUN), "--role", "balancer", "--processes", str(n), "--config", str(config)]
                group = stack.enter_context(started(command, placement, workdir, f"lb-{n}", cwd=workdir))
                url = f"http://127.0.0.1:{port}"
                wait_for_instances(url, group, n)
                urls[f"lb-{n}"], groups[f"lb-{n}"] = url + PATH, group
            if shutil.which("nginx"):
                for sub in ("nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"):
                    (workdir / sub).mkdir(exist_ok=True)
                for n in counts:
                    port = free_port()
                    conf = nginx_config(workdir, port, backends, workers=n, name=f"nginx-{n}")
                    nginx = stack.enter_context(
                        started(["nginx", "-c", str(conf), "-p", str(workdir)], placement, workdir, f"nginx-{n}")
                    )
                    urls[f"nginx-{n}"], groups[f"nginx-{n}"] = f"http://127.0.0.1:{port}{PATH}", nginx
                    wait_until_answers(urls[f"nginx-{n}"], nginx, f"nginx with {n} workers")
            else:
                print("nginx is not installed: lb_system alone", flush=True)
            expected = get(urls["direct-1"])[1]
            for name, url in urls.items():
                status, body = get(url)
                if status != 200 or len(body) != len(expected):
                    raise SystemExit(f"{name} answers {status} with {len(body)} bytes, expected 200 with {len(expected)}")
            # The proxy's processes only: a group's parent and children, nginx's master and workers.
            pids = {"direct-1": [], **{name: process_tree(process.pid) for name, process in groups.items()}}
            print(f"scaling: {gen.name}, {os.cpu_count()} CPUs, cases {', '.join(urls)}", flush=True)
            cases = throughput_rounds(gen, urls, pids, args)
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    settings = {"path": PATH, "connections": args.connections, "duration": args.duration, "rounds": args.rounds}
    results = {
        "machine": machine | {"generator": gen.name},
        "settings": settings | {"warmup": args.warmup, "processes": args.processes},
        "cases": cases,
    }
    results["ratios"], results["ratios_per_round"] = summarize(cases, args.processes)
    save_results(results, render(results), "scaling", args.json)
    return 0
