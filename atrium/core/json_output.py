"""What atrium writes as JSON: one ``default`` for the values orjson does not know.

HTTP bodies (``http/json.py``), WebSocket frames (``protocol.encode``) and stored event
payloads (``persistence/events.py``) all serialise through ``default``, so a UUID or a
datetime reads the same in all three. Datetimes use orjson's own RFC 3339 form in UTC
with a ``Z`` (``OPTIONS``), the format of ``atrium.core.timestamps``.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
"""Datetimes in UTC with a ``Z``; naive ones are taken as UTC."""


def default(value: Any) -> Any:
    """The JSON form of what orjson does not serialise itself: asyncpg's UUID subclass (a
    string) and pydantic models (their JSON mode dump). Raises TypeError for anything else,
    so an unexpected value fails loudly instead of being written as its ``repr``."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """``value`` as JSON bytes (``OPTIONS``, ``default``); string keys only."""
    return orjson.dumps(value, option=OPTIONS, default=default)
