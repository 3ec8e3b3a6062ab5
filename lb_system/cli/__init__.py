"""The command line: `python run.py [serve|check|demo]` and the `lb-system` script."""

from __future__ import annotations

from lb_system.cli.main import main

__all__ = ["main"]
