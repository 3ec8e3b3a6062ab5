"""Hot reload, the policy half: what changed between the running config and an edited one,
and whether all of it can be applied live. No I/O here; the System applies a plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lb_system.config import BackendConfig, Config, ConfigError, redact_url

# (section, key) pairs a running system applies without a restart. Everything else, including
# sections added later, needs one: refusing an edit is safe, silently ignoring part of it is not.
LIVE_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("balancer", "strategy"),
        ("balancer", "hash_on"),
        ("balancer", "drain_timeout"),
        ("balancer", "sticky_cookie"),
        ("errors", "recent"),
        ("log", "level"),
        ("admin", "token_env"),
        ("control", "read_token_env"),
        # Other files: the next TLS handshakes get the new certificate (operations/tls.py).
        ("balancer", "tls_cert"),
        ("balancer", "tls_key"),
        ("control", "tls_cert"),
        ("control", "tls_key"),
        # The forwarder reads these per request (Forwarder.apply_config).
        ("proxy", "retries"),
        ("proxy", "retry_on_status"),
        ("proxy", "connect_timeout"),
        ("proxy", "per_try_timeout"),
        ("proxy", "request_timeout"),
        ("proxy", "trusted_proxies"),
        ("proxy", "max_pending"),
        # Each new client connection reads these (proxy/client_limits.py).
        ("proxy", "header_timeout"),
        ("proxy", "body_timeout"),
        ("proxy", "max_header_section_bytes"),
    }
)
LIVE_SECTIONS: frozenset[str] = frozenset({"health"})
_TLS_FILES = frozenset({"tls_cert", "tls_key"})


class RestartRequired(ConfigError):
    """The edit touches a key that only a restart can apply; nothing of it was applied."""


@dataclass(frozen=True)
class BackendEdit:
    """A backend kept by name whose settings changed."""

    old: BackendConfig
    new: BackendConfig

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def moved(self) -> bool:
        """Its address changed: a hosted one listens elsewhere, an outside one is another server."""
        old, new = self.old, self.new
        return (old.port, old.host, old.url) != (new.port, new.host, new.url)

    @property
    def fields(self) -> list[str]:
        old, new = self.old.model_dump(), self.new.model_dump()
        return [key for key in new if old[key] != new[key]]


@dataclass(frozen=True)
class ReloadPlan:
    """What applying `config` over the running one does."""

    config: Config
    added: tuple[BackendConfig, ...] = ()
    removed: tuple[str, ...] = ()
    edited: tuple[BackendEdit, ...] = ()
    settings: tuple[str, ...] = ()  # "[health] interval: 2.0 -> 0.5"
    order_changed: bool = False

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.edited or self.settings or self.order_changed)

    def changes(self) -> list[str]:
        """One line per change, for the log and the admin API."""
        lines = [f"backend added: {b.name}" for b in self.added]
        lines += [f"backend removed: {name}" for name in self.removed]
        for edit in self.edited:
            parts = ", ".join(f"{key} {getattr(edit.old, key)!r} -> {getattr(edit.new, key)!r}" for key in edit.fields)
            lines.append(f"backend edited: {edit.name} ({parts})")
        if self.order_changed and not (self.added or self.removed):
            lines.append("backend order changed")
        return lines + list(self.settings)

    def summary(self) -> dict[str, object]:
        return {
            "changed": not self.empty,
            "added": [b.name for b in self.added],
            "removed": list(self.removed),
            "edited": [{"name": e.name, "fields": e.fields} for e in self.edited],
            "settings": list(self.settings),
            "changes": self.changes(),
        }


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"health": {"path": "/x"}} as {"health.path": "/x"}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _pool_changes(running: Config, edited: Config) -> list[str]:
    """The keys of [pools.NAME] tables changed as written (what the global keys change shows in their own lines)."""
    lines = []
    for name in sorted(running.pools.keys() | edited.pools.keys()):
        before, after = _flat(running.written_pool(name)), _flat(edited.written_pool(name))
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) != after.get(key):
                lines.append(f"[pools.{name}] {key}: {before.get(key)!r} -> {after.get(key)!r}")
    return lines


def _route_changes(running: Config, edited: Config) -> list[str]:
    """Routes added, removed, or sending elsewhere; a route is known by its host and prefix."""
    before = {(r.host, r.path_prefix): r for r in running.routes}
    after = {(r.host, r.path_prefix): r for r in edited.routes}
    lines = [f"route added: {r.describe()} -> {r.pool}" for key, r in after.items() if key not in before]
    lines += [f"route removed: {r.describe()}" for key, r in before.items() if key not in after]
    for key, route in after.items():
        old = before.get(key)
        if old is not None and old != route:
            lines.append(
                f"route edited: {route.describe()} (pool {old.pool!r} -> {route.pool!r}, "
                f"strip_prefix {old.strip_prefix} -> {route.strip_prefix})"
            )
    return lines


def _shown(section: str, key: str, value: object) -> str:
    """A setting's value for a message; a database URL without its password."""
    if (section, key) == ("database", "url") and isinstance(value, str):
        value = redact_url(value)
    return repr(value)


def plan_reload(running: Config, edited: Config, *, source: str) -> ReloadPlan:
    """Diff two configs; raise RestartRequired naming the first key that needs a restart."""
    tables = {"backends", "pools", "routes"}  # compared entry by entry below
    old, new = running.model_dump(exclude=tables), edited.model_dump(exclude=tables)
    settings: list[str] = []
    for section in sorted(old.keys() | new.keys()):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) == after.get(key):
                continue
            if key in _TLS_FILES and None in (before.get(key), after.get(key)):
                raise RestartRequired(
                    f"{source}: [{section}] {key}: turning TLS on or off needs a restart "
                    f"({before.get(key)!r} -> {after.get(key)!r}); the edit was not applied"
                )
            if section not in LIVE_SECTIONS and (section, key) not in LIVE_KEYS:
                was, now = _shown(section, key, before.get(key)), _shown(section, key, after.get(key))
                raise RestartRequired(
                    f"{source}: [{section}] {key}: changing it needs a restart ({was} -> {now}); the edit was not applied"
                )
            settings.append(f"[{section}] {key}: {before.get(key)!r} -> {after.get(key)!r}")
    settings += _pool_changes(running, edited) + _route_changes(running, edited)

    running_backends = {b.name: b for b in running.backends}
    edited_names = {b.name for b in edited.backends}
    added = tuple(b for b in edited.backends if b.name not in running_backends)
    removed = tuple(b.name for b in running.backends if b.name not in edited_names)
    edits = tuple(
        BackendEdit(running_backends[b.name], b)
        for b in edited.backends
        if b.name in running_backends and running_backends[b.name] != b
    )
    order_changed = [b.name for b in running.backends] != [b.name for b in edited.backends]
    return ReloadPlan(edited, added, removed, edits, tuple(settings), order_changed)
