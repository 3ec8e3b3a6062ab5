"""What an active check's answer must be: its status in `expect_status`, its body holding
`expect_body`. Pure policy: the checker fetches, this judges."""

from __future__ import annotations

from lb_system.config import HealthConfig, status_allowed


def check_verdict(settings: HealthConfig, status: int, body: bytes) -> str | None:
    """None when the answer passes; otherwise why not, for `last_error` (the body as far as it was read)."""
    if not status_allowed(settings.status_ranges, status):
        return f"expected status {settings.expect_status}, got {status}"
    wanted = settings.expect_body
    if wanted is not None and wanted.encode() not in body:
        return f"expected body containing {wanted!r}, got {status} without it"
    return None


def backend_check_settings(settings: HealthConfig, health_path: str | None) -> HealthConfig:
    """A backend's check settings: its set's (global or its pool's), with its own `health_path`."""
    if health_path is None or health_path == settings.path:
        return settings
    return settings.model_copy(update={"path": health_path})
