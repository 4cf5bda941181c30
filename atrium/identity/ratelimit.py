"""Rate limiting and login backoff behind small interfaces: in this process, or shared by
every process through Redis (``Shared*``, with REDIS_URL), falling back to this process's
own counts while Redis cannot be reached."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..persistence.redis import RedisUnavailable
from ..persistence.shared import LoginFailures, RateHit, RateWindows, Window


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
        allowed = count < limit
        if allowed:
            count += 1
        self._windows[key] = (start, count)
        return _decision(allowed, limit, count, start + window_seconds, now)

    def _maybe_sweep(self, now: float) -> None:
        # Drop finished windows now and then so idle keys do not pile up forever.
        self._hits_since_sweep += 1
        if self._hits_since_sweep < self._SWEEP_EVERY:
            return
        self._hits_since_sweep = 0
        horizon = now - 3600
        self._windows = {k: v for k, v in self._windows.items() if v[0] > horizon}


def _decision(allowed: bool, limit: int, count: int, reset: float, now: float) -> RateDecision:
    return RateDecision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, limit - count),
        reset_at=math.ceil(reset),
        retry_after=0 if allowed else max(1, math.ceil(reset - now)),
    )


class SharedRateLimiter:
    """The windows of ``MemoryRateLimiter``, counted in Redis: a limit holds across every
    process. While Redis cannot be reached, each process counts alone (``fallback``).

    ``hit`` counts with a script of its own; a caller that counts a hit in a script
    that does more (``admission``) takes it with ``stamp``, then turns the window Redis
    gave into a decision with ``decision``, or counts it with ``hit_here`` if Redis could
    not be reached."""

    def __init__(
        self, windows: RateWindows, fallback: MemoryRateLimiter, clock: Callable[[], float]
    ) -> None:
        self._windows = windows
        self._fallback = fallback
        self._clock = clock

    async def hit(self, key: str, limit: int, window_seconds: float = 60.0) -> RateDecision:
        hit = self.stamp(key, limit, window_seconds)
        try:
            window = await self._windows.hit(key, limit, window_seconds, hit.now)
        except RedisUnavailable:
            return await self.hit_here(hit)
        return self.decision(hit, window)

    def stamp(self, key: str, limit: int, window_seconds: float = 60.0) -> RateHit:
        """A hit of ``key`` now, not yet counted."""
        return RateHit(key, limit, window_seconds, self._clock())

    def decision(self, hit: RateHit, window: Window) -> RateDecision:
        """The decision on ``hit``, counted in Redis in ``window``."""
        reset = window.start + hit.window_seconds
        return _decision(window.allowed, hit.limit, window.count, reset, hit.now)

    async def hit_here(self, hit: RateHit) -> RateDecision:
        """Count ``hit`` in this process alone (Redis cannot be reached)."""
        return await self._fallback.hit(hit.key, hit.limit, hit.window_seconds)


class LoginBackoff(Protocol):
    """A per-account delay that grows with failed logins (see ``MemoryLoginBackoff``)."""

    async def retry_after(self, key: str) -> int:
        """Seconds before ``key`` may try again (0: now)."""
        ...

    async def failed(self, key: str) -> None:
        """Record a failed login for ``key``."""
        ...

    async def succeeded(self, key: str) -> None:
        """A successful login clears ``key``'s failures."""
        ...


def _wait(count: int, last_at: float, after: int, max_seconds: float, now: float) -> int:
    """Seconds to wait after ``count`` failures in a row, the latest at ``last_at``."""
    if count < after:
        return 0
    delay = min(max_seconds, 2.0 ** (count - after))
    return max(0, math.ceil(last_at + delay - now))


@dataclass(slots=True)
class _Failures:
    count: int
    last_at: float


class MemoryLoginBackoff:
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

    async def retry_after(self, key: str) -> int:
        """Seconds before ``key`` may try again (0: now)."""
        entry = self._live(key)
        if entry is None:
            return 0
        return _wait(entry.count, entry.last_at, self._after, self._max, self._clock())

    async def failed(self, key: str) -> None:
        """Record a failed login for ``key``."""
        self._maybe_sweep()
        entry = self._live(key)
        self._failures[key] = _Failures((entry.count if entry else 0) + 1, self._clock())

    async def succeeded(self, key: str) -> None:
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


class SharedLoginBackoff:
    """The rule of ``MemoryLoginBackoff`` over failures counted in Redis, so failures on
    every process add up. While Redis cannot be reached, each process counts alone
    (``fallback``)."""

    def __init__(
        self,
        failures: LoginFailures,
        fallback: MemoryLoginBackoff,
        after_failures: int,
        max_seconds: float,
        clock: Callable[[], float],
        *,
        forget_after: float = 900.0,
    ) -> None:
        self._failures = failures
        self._fallback = fallback
        self._after = after_failures
        self._max = max_seconds
        self._clock = clock
        self._forget_after = forget_after

    async def retry_after(self, key: str) -> int:
        try:
            entry = await self._failures.get(key)
        except RedisUnavailable:
            return await self._fallback.retry_after(key)
        now = self._clock()
        if entry is None or now - entry.last_at >= self._forget_after:
            return 0
        return _wait(entry.count, entry.last_at, self._after, self._max, now)

    async def failed(self, key: str) -> None:
        try:
            await self._failures.failed(key, self._clock(), self._forget_after)
        except RedisUnavailable:
            await self._fallback.failed(key)

    async def succeeded(self, key: str) -> None:
        await self._fallback.succeeded(key)
        try:
            await self._failures.clear(key)
        except RedisUnavailable:
            pass  # the failures are forgotten after forget_after anyway
