"""Asking a running balancer: which backends answered a run of requests, and its /status by backend."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp


async def served(http: aiohttp.ClientSession, url: str, count: int, *, path: str = "/x", keyed: bool = False) -> Counter[str]:
    """How many of `count` GETs of `path` each backend answered (X-Backend); every one must be a 200.
    `keyed` sends each request its own X-Key header (for consistent_hash on header:X-Key)."""
    seen: Counter[str] = Counter()
    for i in range(count):
        headers = {"X-Key": f"k{i}"} if keyed else {}
        async with http.get(url + path, headers=headers) as response:
            assert response.status == 200
            seen[response.headers["X-Backend"]] += 1
    return seen


async def backend_statuses(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    """/status's backends by name."""
    async with http.get(url + "/status") as response:
        assert response.status == 200
        return {b["name"]: b for b in (await response.json())["backends"]}
