"""Hosts on one machine: Linux network namespaces on a private bridge, one /24.

    with PrivateNetwork() as net:                   # skip first if unavailable_reason() says why
        db = net.add_host("db", 10)                  # a namespace with 10.231.18.10/24
        net.join(1)                                  # this process's own namespace gets .1
        net.run(db, "python", "run.py", ...)         # a command inside the host
        net.cut(db); net.restore(db)                 # its link down and up again
        net.kill_all(db)                             # SIGKILL to every process in it

The bridge lives in a namespace of its own, so the machine's firewall and bridges are never
involved; the only change outside the namespaces is this process's end of its link (`join`),
removed with the rest. Names carry this process's id: two runs never collide, and namespaces a
killed run left behind are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType

SUBNET = "10.231.18"  # the /24, inside the namespaces only (and on this process's end of its link)
_PREFIX = "lbs"  # every namespace and interface name starts with lbs<pid>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces of earlier runs whose process is gone (a killed test run cleans up nothing)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        owner = name[len(_PREFIX) :].split("-", 1)[0]
        if name.startswith(_PREFIX) and owner.isdigit() and not _alive(int(owner)):
            for pid in _pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", name, check=False)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the ip command is missing (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        for done, what in ((bridge, "a bridge"), (veth, "a veth pair")):
            if done.returncode != 0:
                return f"cannot make {what} in a namespace: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    taken = _ip("-4", "-o", "addr", check=False).stdout
    if f" {SUBNET}." in taken:
        return f"{SUBNET}.0/24 is already in use on this machine"
    return None


def _pids(namespace: str) -> list[int]:
    out = _ip("netns", "pids", namespace, check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


@dataclass(frozen=True)
class Host:
    """One namespace with one link to the bridge."""

    name: str
    namespace: str
    address: str
    switch_port: str  # the link's end on the bridge, in the switch namespace

    def command(self, *args: str) -> list[str]:
        """`args` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *args]


class PrivateNetwork:
    """A bridge in a namespace of its own and hosts (namespaces) linked to it, all removed on exit."""

    def __init__(self) -> None:
        self.tag = f"{_PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._local_link: str | None = None
        self._made: list[str] = []

    def __enter__(self) -> PrivateNetwork:
        remove_leftovers()
        try:
            self._namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def _namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str, octet: int) -> Host:
        """A namespace `<tag>-<name>` with `SUBNET.<octet>/24` on its eth0, linked to the bridge."""
        namespace = f"{self.tag}-{name}"
        port = f"p{octet}"
        self._namespace(namespace)
        _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", namespace, "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        host = Host(name, namespace, f"{SUBNET}.{octet}", port)
        self.hosts[name] = host
        return host

    def join(self, octet: int) -> str:
        """Link this process's own namespace to the bridge as `SUBNET.<octet>`; returns that address."""
        link, port = f"{self.tag}-l", f"p{octet}"
        _ip("link", "add", link, "type", "veth", "peer", "name", port, "netns", self.switch)
        self._local_link = link
        _ip("addr", "add", f"{SUBNET}.{octet}/24", "dev", link)
        _ip("link", "set", link, "up")
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        return f"{SUBNET}.{octet}"

    def cut(self, host: Host) -> None:
        """The host's cable pulled: its port on the bridge goes down."""
        _ip("-n", self.switch, "link", "set", host.switch_port, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.switch_port, "up")

    def kill_all(self, host: Host) -> list[int]:
        """SIGKILL to every process in the host; their pids."""
        pids = _pids(host.namespace)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def close(self) -> None:
        """Kill what still runs in the hosts, remove every namespace and this process's link."""
        for namespace in reversed(self._made):
            for pid in _pids(namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", namespace, check=False)
        self._made.clear()
        if self._local_link is not None:
            _ip("link", "del", self._local_link, check=False)  # gone already with its peer, usually
            self._local_link = None
