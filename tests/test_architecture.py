"""The import contracts cover the whole package: a new module cannot slip outside the layers."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import lb_system

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def layers() -> list[str]:
    """The layers contract's layers, top to bottom ("proxy | tasks" is one layer)."""
    contracts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    return [str(layer) for layer in contract["layers"]]


def test_every_module_of_the_package_is_in_a_layer() -> None:
    layered = {name.strip() for layer in layers() for name in layer.split("|")}
    modules = {info.name for info in pkgutil.iter_modules(lb_system.__path__)}
    assert modules - layered == set(), "add the new module to a layer in pyproject.toml's import contracts"
