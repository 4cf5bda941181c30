"""JSON from strangers (request bodies, WebSocket frames): orjson, with bounded nesting.

orjson reads up to 1,024 levels of nesting but writes at most 254, and Python code that
walks a parsed value recursively (``str()`` of a list, a validator) fails near 1,000: a
value nested deeper than any real request is refused where it is read, before anything
else touches it.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 64  # levels of objects and arrays; the document itself is level 1


class TooDeep(ValueError):
    """The JSON text nests objects and arrays deeper than ``MAX_DEPTH``."""

    def __init__(self) -> None:
        super().__init__(f"JSON must not nest deeper than {MAX_DEPTH} levels")


def loads(raw: str | bytes) -> Any:
    """Parse ``raw`` as JSON. Raises ``orjson.JSONDecodeError`` (a ValueError) for text
    that is not JSON and ``TooDeep`` (a ValueError) past ``MAX_DEPTH`` levels."""
    value = orjson.loads(raw)
    # Nesting needs an opening bracket per level: most texts are shown shallow by a
    # count at C speed, and only the rest are walked.
    if isinstance(raw, str):
        openers = raw.count("[") + raw.count("{")
    else:
        openers = raw.count(b"[") + raw.count(b"{")
    if openers > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise TooDeep()
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels (iteratively:
    the walk itself must not recurse)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
