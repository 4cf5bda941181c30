"""What a supervisor needs to know about a child: how to start it and when to restart it."""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import trio

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Restart(enum.StrEnum):
    """When a child that ended is started again (OTP restart types)."""

    PERMANENT = "permanent"
    """Always: after an error and after a normal return."""
    TRANSIENT = "transient"
    """Only after an error; a normal return removes the child."""
    TEMPORARY = "temporary"
    """Never; the child is removed whenever it ends."""


class Strategy(enum.StrEnum):
    """Which children restart when one fails (OTP strategies)."""

    ONE_FOR_ONE = "one_for_one"
    """Only the child that ended."""
    ONE_FOR_ALL = "one_for_all"
    """All children: the others stop in reverse start order, then all start in order."""
    REST_FOR_ONE = "rest_for_one"
    """The child that ended and the children started after it, stopped and restarted
    the same way."""


class ChildFactory(Protocol[T_co]):
    """Starts a child: an async callable that calls ``task_status.started(value)`` once the
    child is up, then runs until the child ends (the ``nursery.start`` convention).

    A child may pass a value with a ``request_stop()`` method to ``started`` (actors pass
    themselves) to be asked to stop gracefully before being cancelled.
    """

    def __call__(self, *, task_status: trio.TaskStatus[T_co]) -> Awaitable[object]: ...


@dataclass(frozen=True, slots=True)
class ChildSpec(Generic[T]):
    """How to start a child and what to do when it ends."""

    name: str
    """Unique among the supervisor's children."""
    factory: ChildFactory[T]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout: float = 5.0
    """Seconds between the graceful stop request and the forced cancel."""
    kind: Literal["worker", "supervisor"] = "worker"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before a restart: exponential per child, capped.

    The n-th restart of a child within the supervisor's ``period`` waits
    ``min(maximum, base * 2 ** (n - 1))`` seconds, times a uniform random factor in
    ``[1 - jitter, 1]`` (``jitter`` defaults to 0, so delays are exact). Restarts older than
    ``period`` no longer count, so n falls back to 1 once a child has been stable.
    """

    base: float = 0.1
    maximum: float = 10.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.maximum < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs base >= 0, maximum >= 0 and 0 <= jitter <= 1")

    def delay(self, n: int) -> float:
        """Seconds to wait before the n-th restart (n >= 1)."""
        # Cap the exponent: 2 ** n overflows a float long before a real supervisor gets
        # there, and the maximum is reached far earlier anyway.
        delay = min(self.maximum, self.base * 2.0 ** min(n - 1, 60))
        if self.jitter:
            delay *= 1 - self.jitter * random.random()
        return delay
