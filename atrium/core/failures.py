"""Failure boundaries' bookkeeping: what ended one unit of work instead of a shared child.

A connection and a request are each their own failure domain (DESIGN.md): an unexpected
exception ends that unit alone (close 1011, a 500 JSON error). The boundary that caught
it calls ``ContainedFailures.record`` once, which logs it with its context and counts it,
so an operator sees in ``/health/supervisor`` what the supervision tree no longer shows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

log = logging.getLogger("atrium.failures")

Unit = Literal["connection", "request"]
UNITS: tuple[Unit, ...] = ("connection", "request")


def leaf(error: BaseException) -> BaseException:
    """``error`` without the exception groups that only wrap one exception (a nursery's)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class ContainedFailures:
    """Counts, per unit kind, the unexpected exceptions a failure boundary contained.

    One per process (the counts outlive a restarted HTTP child); never raises.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[Unit, int] = dict.fromkeys(UNITS, 0)

    def record(self, unit: Unit, error: BaseException, context: Mapping[str, object]) -> None:
        """Count one contained failure of ``unit`` and log it once, with ``context`` (who
        and where: transport, project, user, request) and the traceback."""
        self._counts[unit] += 1
        error = leaf(error)
        where = " ".join(f"{key}={value}" for key, value in context.items() if value is not None)
        log.error(
            "contained %s failure (%s): %s: %s",
            unit,
            where,
            type(error).__name__,
            error,
            exc_info=error,
            extra={"unit": unit, **{f"ctx_{k}": v for k, v in context.items()}},
        )

    def counts(self) -> dict[str, int]:
        """The failures contained so far, by unit kind (every kind present, 0 included)."""
        return {unit: count for unit, count in self._counts.items()}
