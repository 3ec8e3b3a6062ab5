"""The balancer's client-facing edge: what a client can send that no backend must pay for."""

from __future__ import annotations

import pytest


@pytest.fixture
async def hosted(make_config, start_system):
    """A system with its two hosted task backends; one failed proxied request would eject a backend."""
    return await start_system(make_config(health={"interval": 60.0, "passive_fall": 1, "passive_5xx": True}))


async def test_a_100000_deep_json_body_is_400_and_ejects_nothing(hosted, http) -> None:
    for _ in range(3):
        async with http.post(
            hosted.balancer_url + "/tasks", data=b"[" * 100_000, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
            assert response.content_type == "application/problem+json"
    assert all(b.healthy and b.consecutive_failures == 0 for b in hosted.pool.backends)
