"""The command line: `python run.py [serve|check|demo] [--role all|backends|balancer] [--processes N]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import lb_system
from lb_system.cli.demo import Unreachable, run_demo
from lb_system.cli.failover import run_failover
from lb_system.config import (
    DEFAULT_CONFIG_PATH,
    ROLES,
    Config,
    ConfigError,
    check_processes,
    check_role,
    load_config,
    missing_read_token,
)
from lb_system.observability.log import LOGGER_NAME, configure_logging
from lb_system.operations.serving import StartupError, dial_url
from lb_system.operations.supervisor import PARENT_PID_ENV, Supervisor, parent_watch
from lb_system.operations.system import System
from lb_system.proxy.admin import admin_api_on


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="lb_system: a load balancer with built-in fault detection.")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "check", "demo"),
        help="serve (default): start the system; check: validate the config; demo: provoke errors through a running system",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="config file (default: %(default)s)")
    parser.add_argument(
        "--role",
        default="all",
        choices=ROLES,
        help="serve, check: all (default): backends and balancer in one process; backends: only the hosted task-API "
        "backends; balancer: only the balancer, in front of url backends",
    )
    parser.add_argument(
        "--processes",
        type=_at_least_one,
        metavar="N",
        help="serve, check, with --role balancer: run N balancer processes on one port ([balancer] reuse_port) under "
        "one parent that forwards SIGTERM, SIGINT and SIGHUP and restarts a child that dies",
    )
    # Set by the parent of --processes for each child: it listens on [balancer] instance_port + index.
    parser.add_argument("--instance-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help="demo: the balancer's URL (default: from the config)")
    parser.add_argument(
        "--failover",
        action="store_true",
        help="demo: rehearse a failover: stop a hosted backend through the admin API under steady traffic, then start it",
    )
    parser.add_argument("--backend", default="backend-2", help="demo --failover: the backend to stop (default: %(default)s)")
    return parser


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> list[int]:
    """SIGINT/SIGTERM ask for a clean stop; a second one exits at once. Windows has no
    loop signal handlers: there Ctrl-C cancels the main task, which stops cleanly too."""
    installed: list[int] = []
    requested = False

    def on_signal() -> None:
        nonlocal requested
        if requested:
            os._exit(130)
        requested = True
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    return installed


def tune_gc() -> None:
    """For a long-running server, once it is up: keep what start-up allocated out of the
    collector's passes (gc.freeze), and collect the young generation after 10,000 net
    allocations instead of 700. A proxied request frees nearly everything it allocates by
    reference counting, so the frequent passes found nothing; under load they took ~10% of the
    CPU, and the full ones (~20 ms each) showed in p99. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def install_reload_signal(loop: asyncio.AbstractEventLoop, reload: Callable[[], None]) -> list[int]:
    """SIGHUP reloads the config where the platform has it (not on Windows: the file watcher
    and POST /admin/reload do the same there)."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return []
    try:
        loop.add_signal_handler(sighup, reload)
    except (NotImplementedError, RuntimeError, ValueError):
        return []
    return [sighup]


async def serve(config: Config, config_path: str | None = None, role: str = "all", instance_index: int = 0) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = _install_stop_signals(loop, stop.set)
    system = System(config, config_path=config_path, role=role, instance_index=instance_index)
    installed += install_reload_signal(loop, lambda: system.request_reload("SIGHUP"))
    parent = os.environ.get(PARENT_PID_ENV)
    # A child of --processes stops with its parent, even one killed without a word (SIGKILL).
    watch = loop.create_task(parent_watch(int(parent), stop.set)) if parent and parent.isdigit() else None
    try:
        try:
            await system.start()
        except StartupError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        tune_gc()
        # One write: print() writes the text and the newline apart, and the log thread's console
        # lines could land between them.
        sys.stderr.write(_banner(system) + "\n")
        sys.stderr.flush()
        try:
            await stop.wait()
        except asyncio.CancelledError:
            # Windows: Ctrl-C cancels this task. Un-cancel it so the graceful stop below can wait
            # for in-flight requests instead of being cut short by the pending cancellation.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        return 0
    finally:
        if watch is not None:
            watch.cancel()
        await system.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _banner(system: System) -> str:
    """The console's start-up line: the role, where everything is, whether the admin API is on; no empty segment."""
    hosted = ", ".join(f"{name} on {backend.url}" for name, backend in system.hosted.items())
    if system.serves_balancer:
        token_env = system.config.admin.token_env
        on = admin_api_on(system.config)
        admin = f"admin API on (token in {token_env})" if on else f"admin API off (set {token_env} to turn it on)"
        control = f"control on {system.control_url}" if system.control_url else ""
        redirect = f"redirect to HTTPS from {system.redirect_url}" if system.redirect_url else ""
        segments = [
            f"balancer on {system.balancer_url}",
            control,
            redirect,
            f"dashboard at {system.dashboard_url}",
            hosted,
            admin,
        ]
    else:
        segments = [hosted or "no hosted backends"]
    segments += [f"role {system.role}", "Ctrl-C stops"]
    return "lb_system: " + "; ".join(segment for segment in segments if segment)


def new_event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when the `fast` extra is installed; the standard loop otherwise (and on Windows)."""
    if sys.platform == "win32":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config: Config | None
    try:
        config = load_config(args.config)
        if args.command != "demo":
            check_role(config, args.role, source=args.config)
            if args.processes is not None:
                if args.role != "balancer":
                    raise ConfigError(f"--processes runs balancer processes: add --role balancer (got --role {args.role})")
                check_processes(config, args.processes, source=args.config)
    except ConfigError as error:
        if not (args.command == "demo" and args.url):
            print(f"error: {error}", file=sys.stderr)
            return 2
        config = None  # the demo only needs the URL it was given

    if args.command == "demo":
        return _demo(args, config)
    assert config is not None
    if args.command == "check":
        role = "" if args.role == "all" else f" (role {args.role})"
        processes = "" if args.processes is None else f", {args.processes} processes"
        print(f"{args.config}: ok{role}{processes}: {config.summary()}")
        return 0

    missing = missing_read_token(config) if args.role != "backends" else None
    if missing is not None:  # the environment, not the file: `check` cannot see it
        print(f"error: {args.config}: {missing}", file=sys.stderr)
        return 2
    listener = configure_logging(config.log)
    try:
        if args.processes is not None:
            return asyncio.run(_supervise(config, args))
        with asyncio.Runner(loop_factory=new_event_loop_factory()) as runner:
            return runner.run(serve(config, args.config, args.role, args.instance_index))
    except KeyboardInterrupt:
        return 0
    finally:
        listener.stop()


async def _supervise(config: Config, args: argparse.Namespace) -> int:
    """--processes N: this process serves nothing; it runs N `--role balancer` children."""
    config_path = os.path.abspath(args.config)
    # The children import this very lb_system, installed or not.
    package_root = str(Path(lb_system.__file__).resolve().parent.parent)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}

    def command(index: int) -> list[str]:
        args_ = ["serve", "--config", config_path, "--role", "balancer", "--instance-index", str(index)]
        return [sys.executable, "-m", "lb_system.cli", *args_]

    supervisor = Supervisor(
        command,
        args.processes,
        logger=logging.getLogger(LOGGER_NAME),
        stop_timeout=config.balancer.shutdown_grace + 5,
        env=env,
    )
    supervisor.install_signals(asyncio.get_running_loop())
    return await supervisor.run()


def control_endpoint(config: Config) -> tuple[str | None, dict[str, str] | None]:
    """Where the balancer's own endpoints are ([control] port, else the traffic port: None), and
    the read token's header when one is set."""
    control = config.control
    if control.port is None:
        return None, None
    token = os.environ.get(control.read_token_env, "") if control.read_token_env else ""
    url = dial_url(control.host, control.port, "https" if control.tls else "http")
    return url, {"Authorization": f"Bearer {token}"} if token else None


def _demo(args: argparse.Namespace, config: Config | None) -> int:
    """`demo` and `demo --failover` against a running system; `config` is None only with --url."""
    if args.url:
        url: str = args.url
    else:
        assert config is not None
        url = dial_url(config.balancer.host, config.balancer.port)
    try:
        if args.failover:
            token_env = (config or Config()).admin.token_env
            token = os.environ.get(token_env, "")
            if not token:
                print(
                    f"error: the failover demo drives the admin API: set {token_env} to the token the system was started with",
                    file=sys.stderr,
                )
                return 2
            return asyncio.run(run_failover(url, token, backend=args.backend))
        stats_url, stats_headers = control_endpoint(config) if not args.url and config is not None else (None, None)
        return asyncio.run(run_demo(url, stats_url=stats_url, stats_headers=stats_headers))
    except Unreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
