"""A circuit breaker: stop calling a service that keeps failing, and find out at once when
it is back.

The breaker is told the outcome of each call (``success``, ``failure``) and asked whether a
call may go ahead (``allow``, never blocking); it reads the time from an injected clock
(trio's by default, so tests drive it with ``MockClock``).

``failures`` failures in a row open it: calls are then refused at once. While it is open,
``run`` probes the service (a caller-supplied check, for Redis a PING on a connection of its
own) after ``first_probe_seconds``, then doubling up to ``reset_seconds`` between probes,
each wait with jitter (a random 50-100 % of it, so processes that lost the service
together do not probe in step); ``successes`` probes in a row that succeed close it.
Calls never wait on a probe: an open breaker refuses them until a probe closed it. So a
service that is back is used again within about ``reset_seconds`` (1 s by default) of
answering, however long it was away.

Before issue 20 an open breaker waited ``reset_seconds`` (60) and then let trial calls
through (half-open); ``reset_seconds`` is now the longest wait between two probes, and
``successes`` counts probes instead of trial calls.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .config import DEFAULTS


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    """Calls go ahead; failures in a row are counted."""
    OPEN = "open"
    """Calls are refused without trying; probes decide when it closes."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens, how often an open one probes, and what closes it
    (REDIS_BREAKER_* settings)."""

    failures: int = DEFAULTS.redis_breaker_failures
    reset_seconds: float = DEFAULTS.redis_breaker_reset_seconds
    """The longest wait between two probes of an open breaker."""
    successes: int = DEFAULTS.redis_breaker_successes
    """Probes in a row that must succeed to close it."""
    first_probe_seconds: float = 0.25
    """The wait before the first probe (doubling from there up to ``reset_seconds``)."""

    def __post_init__(self) -> None:
        if self.failures < 1 or self.successes < 1 or self.reset_seconds < 0:
            raise ValueError("a breaker needs failures >= 1, successes >= 1, reset_seconds >= 0")
        if self.first_probe_seconds <= 0:
            raise ValueError("a breaker needs first_probe_seconds > 0")


# No wait shorter than this between probes (reset_seconds 0 would otherwise spin).
_MIN_PROBE_WAIT = 0.01


class CircuitBreaker:
    """The state of one breaker (see the module docstring). ``clock`` returns seconds;
    ``jitter`` returns a number in [0, 1) (``random.random``; tests pass a constant)."""

    __slots__ = (
        "settings",
        "_clock",
        "_jitter",
        "_state",
        "_failures",
        "_probes_ok",
        "_probes_failed",
        "_changed",
        "opened_at",
        "closed_at",
        "opens",
        "probes",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = trio.current_time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._jitter = jitter
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probes_ok = 0
        self._probes_failed = 0
        self._changed = trio.Event()  # set (and replaced) at every change of state
        self.opened_at: float | None = None
        """When it last opened (``clock``), None if never."""
        self.closed_at: float | None = None
        """When a probe last closed it, None if never."""
        self.opens = 0
        """How many times the breaker has opened (a counter for operators)."""
        self.probes = 0
        """How many probes it has made."""

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now (False only while open). Never blocks."""
        return self._state is BreakerState.CLOSED

    def success(self) -> None:
        """A call succeeded: clears the failure count. A call that began before the
        breaker opened and succeeds late does not close it: probes do."""
        self._failures = 0

    def failure(self) -> None:
        """A call failed: opens the breaker after ``failures`` in a row. A failure
        reported while open (a call that began before it opened) changes nothing."""
        if self._state is BreakerState.OPEN:
            return
        self._failures += 1
        if self._failures >= self.settings.failures:
            self._set(BreakerState.OPEN)

    def next_probe_in(self) -> float:
        """Seconds to wait before the next probe of an open breaker: the first after
        ``first_probe_seconds``, doubling with each failed probe up to ``reset_seconds``,
        each with jitter (50-100 % of it)."""
        settings = self.settings
        ceiling = settings.first_probe_seconds * 2.0 ** min(self._probes_failed, 32)
        wait = min(settings.reset_seconds, ceiling)
        return max(_MIN_PROBE_WAIT, wait * (0.5 + self._jitter() / 2))

    def probed(self, ok: bool) -> None:
        """A probe's outcome: ``successes`` in a row close an open breaker."""
        self.probes += 1
        if self._state is not BreakerState.OPEN:
            return
        if not ok:
            self._probes_ok = 0
            self._probes_failed += 1
            return
        self._probes_ok += 1
        if self._probes_ok >= self.settings.successes:
            self._set(BreakerState.CLOSED)

    async def wait_state(self, state: BreakerState) -> None:
        """Return once the breaker is in ``state`` (at once if it is)."""
        while self._state is not state:
            await self._changed.wait()

    async def run(self, probe: Callable[[], Awaitable[bool]]) -> None:
        """Until cancelled: whenever the breaker is open, ``probe()`` (True: the service
        answered) at the waits of ``next_probe_in``, until it closes. ``probe`` must
        bound its own time and not raise for the service's failures."""
        while True:
            await self.wait_state(BreakerState.OPEN)
            while self._state is BreakerState.OPEN:
                await trio.sleep(self.next_probe_in())
                self.probed(await probe())

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self._failures = self._probes_ok = self._probes_failed = 0
        if state is BreakerState.OPEN:
            self.opened_at = self._clock()
            self.opens += 1
        else:
            self.closed_at = self._clock()
        self._changed.set()
        self._changed = trio.Event()
