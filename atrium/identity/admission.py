"""Admitting an authenticated request: its login session must be live, and then the
request counts against its user's rate limit.

``LocalAdmission`` reads the session cache (else the database, through ``fill``), then
counts the hit, each behind its own interface. ``SharedAdmission`` (REDIS_URL), where both
live in Redis, asks Redis once when the session is cached here: whether the user's cache
generation is still the one the session was read under and, only if so, the hit
(``SharedUserCache.get_then_hit``, one Lua script). So a request whose session is cached
costs one Redis round trip, not two. Otherwise (not cached here, invalidated since, Redis
away) it takes the two steps, under every rule of each: the generation rule and
single-flight fills of the cache, nothing served from the cache and each process counting
alone while Redis is away. A request whose session is not live is not counted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from ..persistence.redis import RedisUnavailable
from .cache import Fill, SharedUserCache, UserCache
from .ratelimit import RateDecision, RateLimiter, SharedRateLimiter


@dataclass(frozen=True, slots=True)
class Admitted:
    """A live session's value (from the cache or ``fill``) and the request's count
    against the rate limit."""

    value: Any
    rate: RateDecision


class Admission(Protocol):
    async def admit(
        self, user_id: uuid.UUID, key: str, fill: Fill, *, rate_key: str, limit: int
    ) -> Admitted | None:
        """The session ``key`` of ``user_id`` from the session cache, or ``fill()``'s
        value, and the request counted against ``limit`` hits a minute of ``rate_key``;
        None (nothing counted) when the session is not live (``fill`` gave None).
        Raises what ``fill`` raises."""
        ...


class LocalAdmission:
    """The session cache, then the rate limiter."""

    def __init__(self, sessions: UserCache, limiter: RateLimiter) -> None:
        self._sessions = sessions
        self._limiter = limiter

    async def admit(
        self, user_id: uuid.UUID, key: str, fill: Fill, *, rate_key: str, limit: int
    ) -> Admitted | None:
        found = await self._sessions.get_or_fill(user_id, key, fill)
        if found.value is None:
            return None
        return Admitted(found.value, await self._limiter.hit(rate_key, limit))


class SharedAdmission:
    """A session cached here and the rate limit in one Redis round trip (see the module
    docstring); the session cache, then the rate limiter, otherwise."""

    def __init__(self, sessions: SharedUserCache, limiter: SharedRateLimiter) -> None:
        self._sessions = sessions
        self._limiter = limiter

    async def admit(
        self, user_id: uuid.UUID, key: str, fill: Fill, *, rate_key: str, limit: int
    ) -> Admitted | None:
        hit = self._limiter.stamp(rate_key, limit)
        away = False
        try:
            cached = await self._sessions.get_then_hit(user_id, key, hit)
        except RedisUnavailable:
            cached, away = None, True
        if cached is not None:
            entry, window = cached
            return Admitted(entry.value, self._limiter.decision(hit, window))
        found = await self._sessions.get_or_fill(user_id, key, fill)
        if found.value is None:
            return None
        # Redis just failed this request: count here rather than wait for it again.
        rate = await (self._limiter.hit_here(hit) if away else self._limiter.hit(rate_key, limit))
        return Admitted(found.value, rate)
