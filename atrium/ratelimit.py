"""Rate limiting behind a small interface (in-process now; Redis-backed later)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one hit: what the X-RateLimit-* headers report."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # epoch seconds when the window resets
    retry_after: int  # seconds to wait when not allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        values = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }
        if not self.allowed:
            values["Retry-After"] = str(self.retry_after)
        return values


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_seconds: float = 60.0) -> RateDecision:
        """Count one request against ``key``; say whether it is within ``limit``."""
        ...


class MemoryRateLimiter:
    """Fixed windows per key, anchored at the key's first hit; one process only.

    ``clock`` returns wall-clock seconds; tests pass a clock they move by hand.
    """

    _SWEEP_EVERY = 10_000

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._hits_since_sweep = 0

    async def hit(self, key: str, limit: int, window_seconds: float = 60.0) -> RateDecision:
        now = self._clock()
        self._maybe_sweep(now)
        start, count = self._windows.get(key, (now, 0))
        if now >= start + window_seconds:
            start, count = now, 0
        reset = start + window_seconds
        allowed = count < limit
        if allowed:
            count += 1
        self._windows[key] = (start, count)
        return RateDecision(
            allowed=allowed,
            limit=limit,
            remaining=max(0, limit - count),
            reset_at=math.ceil(reset),
            retry_after=0 if allowed else max(1, math.ceil(reset - now)),
        )

    def _maybe_sweep(self, now: float) -> None:
        # Drop finished windows now and then so idle keys do not pile up forever.
        self._hits_since_sweep += 1
        if self._hits_since_sweep < self._SWEEP_EVERY:
            return
        self._hits_since_sweep = 0
        horizon = now - 3600
        self._windows = {k: v for k, v in self._windows.items() if v[0] > horizon}


@dataclass(slots=True)
class _Failures:
    count: int
    last_at: float


class LoginBackoff:
    """A per-account delay that grows with failed logins, from any address; one process.

    After ``after_failures`` failures in a row for a key (an email), each further attempt
    must wait ``2 ** (failures - after_failures)`` seconds after the latest failure, capped
    at ``max_seconds``; a success clears the key, and so do ``forget_after`` seconds
    without a failure. Only failures count, so whoever knows the password gets in at
    most ``max_seconds`` after the last failure, however many addresses keep failing.
    ``clock`` returns wall-clock seconds; tests pass a clock they move by hand.
    """

    _SWEEP_EVERY = 10_000

    def __init__(
        self,
        after_failures: int,
        max_seconds: float,
        clock: Callable[[], float] = time.time,
        *,
        forget_after: float = 900.0,
    ) -> None:
        self._after = after_failures
        self._max = max_seconds
        self._clock = clock
        self._forget_after = forget_after
        self._failures: dict[str, _Failures] = {}
        self._changes_since_sweep = 0

    def retry_after(self, key: str) -> int:
        """Seconds before ``key`` may try again (0: now)."""
        entry = self._live(key)
        if entry is None or entry.count < self._after:
            return 0
        delay = min(self._max, 2.0 ** (entry.count - self._after))
        wait = entry.last_at + delay - self._clock()
        return max(0, math.ceil(wait))

    def failed(self, key: str) -> None:
        """Record a failed login for ``key``."""
        self._maybe_sweep()
        entry = self._live(key)
        self._failures[key] = _Failures((entry.count if entry else 0) + 1, self._clock())

    def succeeded(self, key: str) -> None:
        """A successful login clears ``key``'s failures."""
        self._failures.pop(key, None)

    def _live(self, key: str) -> _Failures | None:
        entry = self._failures.get(key)
        if entry is not None and self._clock() - entry.last_at >= self._forget_after:
            del self._failures[key]
            return None
        return entry

    def _maybe_sweep(self) -> None:
        self._changes_since_sweep += 1
        if self._changes_since_sweep < self._SWEEP_EVERY:
            return
        self._changes_since_sweep = 0
        horizon = self._clock() - self._forget_after
        self._failures = {k: v for k, v in self._failures.items() if v.last_at > horizon}
