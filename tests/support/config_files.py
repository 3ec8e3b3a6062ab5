"""Configs for tests: fast health checks, and config.toml files rewritten while a system runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lb_system import Config, load_config

# Fast health checks (the shortest interval the config allows) so state changes show within a fraction of a second.
FAST_HEALTH = {"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1}

# Two hosted backends on free ports, the database and the log in the test's folder.
BASE_CONFIG: dict[str, Any] = {
    "balancer": {"port": 0},
    "health": FAST_HEALTH,
    "database": {"path": "tasks.db"},
    "log": {"file": "balancer.log"},
    "backends": [{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}],
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s sections merged in, key by key (neither is changed)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(name: str, values: dict[str, Any], lines: list[str]) -> None:
    """`[name]` with its scalars, then its sub-tables as `[name.key]` ([pools.api.health])."""
    lines.append(f"[{name}]")
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if not isinstance(value, dict)]
    for key, value in values.items():
        if isinstance(value, dict):
            _table(f"{name}.{key}", value, lines)


def toml_text(data: dict[str, Any]) -> str:
    """The TOML for a config dict: sections (with sub-tables), then arrays of tables ([[backends]], [[routes]])."""
    lines: list[str] = []
    arrays = {key: value for key, value in data.items() if isinstance(value, list)}
    for section, values in data.items():
        if section not in arrays:
            _table(section, values, lines)
    for name, entries in arrays.items():
        for entry in entries:
            lines.append(f"[[{name}]]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


class ConfigFile:
    """A config.toml in tmp_path, on free ports, that a test rewrites while the system runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = copy.deepcopy(BASE_CONFIG)

    def write(self, backends: list[dict[str, Any]] | None = None, **sections: Any) -> None:
        """Merge the given sections (and replace the backends) into the file, then save it."""
        data = merge(self.data, sections)
        if backends is not None:
            data["backends"] = backends
        self.data = data
        self.write_text(toml_text(data))

    def write_text(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")

    def load(self) -> Config:
        return load_config(self.path)
