"""A circuit breaker: stop calling a service that keeps failing, try again later.

Sans-IO: the breaker is told the outcome of each call (``success``, ``failure``) and asked
whether a call may go ahead (``allow``); it never does I/O or sleeps, and reads the time
from an injected clock (trio's by default, so tests drive it with ``MockClock``).

The seed's thresholds: ``failures`` failures in a row open it (calls are refused at once);
``reset_seconds`` after opening it is half-open (calls go ahead as trials); ``successes``
successes in a row close it again, and one failure while half-open opens it again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import trio


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    """Calls go ahead; failures in a row are counted."""
    OPEN = "open"
    """Calls are refused without trying, until ``reset_seconds`` have passed."""
    HALF_OPEN = "half_open"
    """Calls go ahead as trials: enough successes close it, one failure opens it."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and closes (REDIS_BREAKER_* settings)."""

    failures: int = 5
    reset_seconds: float = 60.0
    successes: int = 3

    def __post_init__(self) -> None:
        if self.failures < 1 or self.successes < 1 or self.reset_seconds < 0:
            raise ValueError("a breaker needs failures >= 1, successes >= 1, reset_seconds >= 0")


class CircuitBreaker:
    """The state of one breaker (see the module docstring). ``clock`` returns seconds."""

    __slots__ = ("settings", "_clock", "_state", "_failures", "_successes", "_opened_at", "opens")

    def __init__(
        self, settings: BreakerSettings, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self.opens = 0
        """How many times the breaker has opened (a counter for operators)."""

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose ``reset_seconds`` have passed is half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() >= self._opened_at + self.settings.reset_seconds
        ):
            self._state = BreakerState.HALF_OPEN
            self._successes = 0
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now (False only while open)."""
        return self.state is not BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_seconds - self._clock())

    def success(self) -> None:
        """A call succeeded: clears the failure count; closes a half-open breaker after
        ``successes`` in a row."""
        state = self.state
        self._failures = 0
        if state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.settings.successes:
                self._state = BreakerState.CLOSED

    def failure(self) -> None:
        """A call failed: opens the breaker after ``failures`` in a row, or at once when
        half-open. A failure reported while open (a call that began before it opened)
        changes nothing."""
        state = self.state
        if state is BreakerState.OPEN:
            return
        self._failures += 1
        if state is BreakerState.HALF_OPEN or self._failures >= self.settings.failures:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._successes = 0
        self.opens += 1
