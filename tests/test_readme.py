"""The README's promises about setting up and the command line, checked against the files:
exactly two set-up commands (each with its Windows form) that make and use a virtual
environment, CI running the test command exactly as written, every CLI option documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lb_system.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SERVE = "python3 -m venv .venv && . .venv/bin/activate && python -m pip install -e . && python run.py"
TEST = "python3 -m venv .venv && . .venv/bin/activate && python -m pip install -e '.[test]' && python -m pytest"


def readme_lines_starting(prefix: str) -> list[str]:
    return [line.strip() for line in README.splitlines() if line.strip().startswith(prefix)]


def test_the_readme_has_exactly_two_set_up_commands_and_their_windows_forms() -> None:
    assert readme_lines_starting("python3 -m venv") == [SERVE, TEST]
    windows = readme_lines_starting("py -m venv")
    assert windows == [
        r"py -m venv .venv && .venv\Scripts\activate && python -m pip install -e . && python run.py",
        r'py -m venv .venv && .venv\Scripts\activate && python -m pip install -e ".[test]" && python -m pytest',
    ]
    # No third set-up command beside them.
    assert readme_lines_starting("python -m pip install") == readme_lines_starting("pip install") == []


def test_ci_runs_the_readme_test_command_exactly_as_its_last_line() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[-1] == TEST


def test_every_command_line_option_and_the_lb_system_command_are_documented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", usage))
    assert {"--config", "--url", "--failover", "--backend", "--help"} <= options
    choices = [frozenset(group.split(",")) for group in set(re.findall(r"\{([a-z,]+)\}", usage))]
    (commands,) = [group for group in choices if "serve" in group]
    assert commands == {"serve", "check", "demo"}
    assert {"--role", "--config"} <= options
    assert {"all", "backends", "balancer"} in choices
    for name in sorted(options) + [f"`{c}`" for c in sorted(commands)] + ["lb-system", "`--role all\\|backends\\|balancer`"]:
        assert name in README, name


def test_the_readme_says_how_to_turn_the_crash_endpoint_off() -> None:
    assert "debug_endpoints = false" in README and "[api]" in README
    assert "debug_endpoints = true" in (ROOT / "config.toml").read_text(encoding="utf-8")
