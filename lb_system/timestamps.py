"""One spelling of time for every JSON document and record: ISO 8601 UTC, milliseconds, `Z`."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_utc(timestamp: float) -> str:
    """A POSIX timestamp as `2026-11-28T03:23:47.999Z`."""
    return iso_datetime(datetime.fromtimestamp(timestamp, UTC))


def iso_datetime(moment: datetime) -> str:
    """An aware datetime as `2026-11-28T03:23:47.999Z` (in UTC, cut to milliseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_ms() -> datetime:
    """Now, in UTC, cut to milliseconds: what a stored timestamp keeps, so it reads back as written."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def iso_utc_or_none(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)


def utc_now_iso() -> str:
    return iso_utc(time.time())
