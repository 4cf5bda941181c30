"""What a payload must be, besides matching its task's schema, to be stored and run.

PostgreSQL refuses a NUL character in ``text`` and ``jsonb`` (keys included); orjson
writes integers of at most 64 bits; asyncpg converts an aware datetime to UTC before it
sends one, and ``0001-01-01T00:00:00+14:00`` has no UTC form (``OverflowError``). A
payload with any of these passes its task's schema, then fails at the insert (a 500) or
in every attempt (retried as if the failure were transient). Refused here, at
submission, with the field named, they never reach either.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from ..tasks import InvalidPayload

_INT_RANGE = range(-(2**63), 2**64)  # orjson's


def refuse_unstorable(parsed: BaseModel, dumped: Any) -> None:
    """Raise InvalidPayload naming the first field (dotted, under ``payload``) that
    PostgreSQL or the job's run would refuse: a string or key with a NUL character, an
    integer past 64 bits (in ``dumped``, the JSON form that is stored), or a datetime
    with no UTC form (in ``parsed``, the values the task receives)."""
    for where, value in _walk(dumped, "payload"):
        if isinstance(value, str) and "\x00" in value:
            raise InvalidPayload(where, "must not contain NUL characters")
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT_RANGE:
            raise InvalidPayload(where, "is out of range (at most 64 bits)")
    for where, value in _walk(parsed, "payload"):
        if isinstance(value, datetime) and value.tzinfo is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise InvalidPayload(
                    where, "is out of range: it has no UTC form (year 1 to 9999)"
                ) from None


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every value inside ``value`` with its dotted path; keys are yielded as values of
    their own path (a NUL in a key names the key). Iterative: depth costs no stack."""
    stack = [(where, value)]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, BaseModel):
            stack.extend(
                (f"{where}.{name}", getattr(value, name)) for name in type(value).model_fields
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}"
                stack.append((path, key))
                stack.append((path, item))
        elif isinstance(value, list | tuple | set | frozenset):
            stack.extend((f"{where}.{i}", item) for i, item in enumerate(value))
