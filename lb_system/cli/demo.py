"""`python run.py demo`: provoke the three classic failures through the balancer and show the stats."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import aiohttp

from lb_system.cli.client_errors import describe_failure

SCENARIOS = (
    # (expected status, announcement, method, path, body)
    (400, "Sending an empty JSON body...", "POST", "/tasks", b""),
    (404, "Requesting a task that does not exist...", "GET", "/tasks/999999", None),
    (500, "Forcing an internal error (division by zero)...", "GET", "/debug/crash", None),
)


class Unreachable(Exception):
    """Nothing answers at the URL."""


async def _describe(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        return str(json.loads(text).get("detail", text))
    except (ValueError, AttributeError):
        return text.strip()


async def run_demo(
    url: str, out: TextIO = sys.stdout, *, stats_url: str | None = None, stats_headers: dict[str, str] | None = None
) -> int:
    """0 when the three failures came back with the expected statuses, 1 otherwise. The
    statistics come from `stats_url` (the control listener, when the config has one) or `url`."""
    url = url.rstrip("/")
    all_expected = True
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for expected, announcement, method, path, body in SCENARIOS:
                print(f"[ERROR {expected}] {announcement}", file=out)
                headers = {"Content-Type": "application/json"} if body is not None else None
                async with session.request(method, url + path, data=body, headers=headers) as response:
                    detail = await _describe(response)
                    print(f"Status: {response.status} | Response: {detail}\n", file=out)
                    all_expected &= response.status == expected
            print("[STATS] Error statistics...", file=out)
            async with session.get((stats_url or url).rstrip("/") + "/errors/stats", headers=stats_headers) as response:
                print(json.dumps(await response.json(), indent=2), file=out)
    except (TimeoutError, aiohttp.ClientConnectionError) as error:
        raise Unreachable(f"nothing answers at {url} ({describe_failure(error)}); is `python run.py` running?") from None
    return 0 if all_expected else 1
