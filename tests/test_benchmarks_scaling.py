"""benchmarks/run.py --processes N (issue 18 item 6): the balancer as 1..N reuse-port processes beside
nginx at 1..N workers, in front of `--role backends` processes, in one run. A short run, for its shape
only: never its figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.mark.slow
def test_processes_runs_one_and_two_balancer_processes_beside_nginx_in_one_run(tmp_path: Path) -> None:
    results = tmp_path / "scaling.json"
    command = [sys.executable, str(RUN), "--processes", "2", "--duration", "1", "--rounds", "1", "--warmup", "0.2"]
    done = subprocess.run(
        [*command, "--connections", "8", "--json", str(results)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "run.py --role backends" in done.stdout
    cases = json.loads(results.read_text())["cases"]
    expected = {"direct-1", "lb-1", "lb-2"} | ({"nginx-1", "nginx-2"} if shutil.which("nginx") else set())
    assert set(cases) == expected
    for name, case in cases.items():
        assert case["requests"] > 0 and case["errors"] == 0, (name, case)
