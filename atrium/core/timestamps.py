"""The one timestamp format atrium writes: ISO 8601 in UTC with a ``Z``.

``2024-05-01T12:30:00.123456Z`` (microseconds only when there are some). orjson writes
datetimes in this same form (``json_output``), so a timestamp reads alike in an HTTP
body, a WebSocket frame, a stored payload and the supervision snapshot.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(moment: datetime) -> str:
    """``moment`` (aware, any zone) in UTC, ending in ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc_iso_at(epoch: float) -> str:
    """The wall-clock time ``epoch`` (seconds since 1970) in UTC, ending in ``Z``."""
    return utc_iso(datetime.fromtimestamp(epoch, UTC))


def utc_now_iso() -> str:
    """Now, in UTC, ending in ``Z``."""
    return utc_iso(datetime.now(UTC))
