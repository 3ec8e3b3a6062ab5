"""`python run.py` as a real process: started and read until its start-up line, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

RUN = str(Path(__file__).resolve().parent.parent.parent / "run.py")


async def start_run_py(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """`python run.py ARGS` in `cwd`; returns the process and its `lb_system: ...` start-up line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, RUN, *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
        if not line:
            raise AssertionError(f"run.py exited with {await process.wait()} before serving")
        if line.startswith("lb_system: "):
            return process, line.strip()


async def stop_run_py(process: asyncio.subprocess.Process) -> int:
    """SIGTERM (unless it has ended), then its exit code."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode
