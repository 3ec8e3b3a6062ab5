"""One spelling of time for every JSON document and record: ISO 8601 UTC, milliseconds, `Z`."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_utc(timestamp: float) -> str:
    """A POSIX timestamp as `2026-11-28T03:23:47.999Z`."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_utc_or_none(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)


def utc_now_iso() -> str:
    return iso_utc(time.time())
