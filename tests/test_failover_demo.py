"""`python run.py demo --failover` against a real system."""

from __future__ import annotations

import io

import pytest

from lb_system.cli.failover import run_failover
from lb_system.cli.main import main

TOKEN = "failover-token"


async def test_failover_rehearsal_stops_and_restarts_backend_2_without_a_failed_request(
    make_config, start_system, monkeypatch
) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    system = await start_system(make_config())
    out = io.StringIO()
    code = await run_failover(system.balancer_url, TOKEN, out=out, timeout=10)
    text = out.getvalue()
    assert code == 0, text
    assert "POST /admin/backends/backend-2/stop -> 200" in text
    assert "backend-2: DOWN" in text and "not listening" in text
    assert "backend-2 is down; failed client requests: 0 of" in text
    assert "POST /admin/backends/backend-2/start -> 200" in text
    assert text.rstrip().splitlines()[-1].startswith("[RESULT]") and " 0 failed; served by backend-1 " in text
    assert system.pool.get("backend-2").healthy


async def test_failover_with_a_wrong_token_says_so_and_fails(make_config, start_system, monkeypatch) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    system = await start_system(make_config())
    out = io.StringIO()
    assert await run_failover(system.balancer_url, "wrong", out=out, timeout=5) == 1
    assert "-> 401" in out.getvalue()
    assert system.pool.get("backend-2").listening is True


def test_failover_without_a_token_in_the_environment_exits_2(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no config.toml here: the demo falls back to LB_ADMIN_TOKEN
    assert main(["demo", "--failover", "--url", "http://127.0.0.1:9"]) == 2
    assert "LB_ADMIN_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--failover", "--url", "http://127.0.0.1:9"]])
def test_failover_against_nothing_is_one_clear_line(monkeypatch, capsys, tmp_path, argv) -> None:
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: nothing answers at http://127.0.0.1:9") and "Traceback" not in err
