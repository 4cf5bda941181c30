"""Per-user read caches with a TTL, behind an interface a Redis-backed cache can implement.

Entries belong to a user and are found by a key (e.g. one page of that user's project
list). ``invalidate(user_ids)`` drops everything of those users at once.

A fill races with invalidation: a reader that loaded data before a write committed may try
to store it after the writer invalidated. So a reader takes a ``generation`` token before
it reads the database and hands it to ``set``; ``set`` refuses the value when any of the
user's entries was invalidated after that token was taken. A read after a write therefore
never sees the data from before the write.

Misses are filled once (single-flight): while one caller of ``get_or_fill`` reads the
source for a key, the others asking for the same key wait for that read instead of
running their own, so an expiry under load costs one query, not one per request in flight.

With REDIS_URL, ``SharedUserCache`` keeps values in each process but trusts one only while
the user's generation in Redis is still the one it was read under: an invalidation on any
process is seen by the next read on every process.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..persistence.redis import RedisUnavailable
from ..persistence.shared import Generations, RateHit, Window

log = logging.getLogger("atrium.cache")


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A cached value and when it expires (wall-clock epoch seconds)."""

    value: Any
    expires_at: float


@dataclass(frozen=True, slots=True)
class Filled:
    """What ``get_or_fill`` found: the value, and the entry it came from (``hit``), or
    None when this caller read it from the source itself."""

    value: Any
    hit: CacheHit | None


Fill = Callable[[], Awaitable[Any]]
"""Reads a value from the source (the database); None means "nothing to cache"."""


class UserCache(Protocol):
    """What the HTTP layer needs from a per-user cache (in-process now, Redis later).

    Values are JSON-compatible (dicts, lists, strings, numbers, None), so an
    implementation may serialise them.
    """

    async def generation(self, user_id: uuid.UUID) -> int:
        """A token to take before reading the source, then to pass to ``set``."""
        ...

    async def get(self, user_id: uuid.UUID, key: str) -> CacheHit | None:
        """The user's live entry for ``key``, or None (missing, expired or disabled)."""
        ...

    async def set(
        self, user_id: uuid.UUID, key: str, value: Any, generation: int
    ) -> CacheHit | None:
        """Store ``value`` unless the user was invalidated since ``generation`` was taken.

        Returns the stored entry, or None when nothing was stored (stale fill or disabled).
        """
        ...

    async def invalidate(self, user_ids: Iterable[uuid.UUID]) -> None:
        """Drop every entry of every user in ``user_ids``; fills in flight for them fail."""
        ...

    async def get_or_fill(self, user_id: uuid.UUID, key: str, fill: Fill) -> Filled:
        """The live entry for ``key``, or ``fill()``'s value, stored under the generation
        rule; concurrent misses of one key share one fill (see :class:`SingleFlight`).
        Raises what ``fill`` raises."""
        ...


@dataclass(slots=True)
class _Flight:
    done: trio.Event
    hit: CacheHit | None = None  # what the fill stored
    value: Any = None  # what it read, handed on only when it is None (nothing to store)
    completed: bool = False  # the fill returned (did not raise or get cancelled)


class SingleFlight:
    """The fills in flight in one process, one per (user, key): the first caller to miss
    fills, the others wait for it and get what it stored.

    A follower never gets a value older than its own request: when the fill it waited for
    stored nothing (it raised, was cancelled, or an invalidation raced it and ``set``
    refused the value), the follower looks again (a live entry, or a newer fill), and
    after following ``max_follows`` fills that stored nothing it fills by itself. So no
    one waits for a fill that will not come, and a failing source is tried again by the
    next caller rather than failing everyone with one error. A fill that reads None
    (nothing to cache) hands None to its followers as it is: fills return None only for
    absences that do not come back, such as a revoked session.
    """

    __slots__ = ("_flights", "_max_follows")

    def __init__(self, *, max_follows: int = 2) -> None:
        self._flights: dict[tuple[uuid.UUID, str], _Flight] = {}
        self._max_follows = max_follows

    async def get_or_fill(
        self, cache: UserCache, user_id: uuid.UUID, key: str, fill: Fill
    ) -> Filled:
        """``cache``'s live entry for ``key``, the value of a fill in flight for it, or
        ``fill()``'s value, stored in ``cache`` unless an invalidation raced the read.
        Raises what ``fill`` raises (only to the caller whose fill it was)."""
        followed = 0
        while True:
            hit = await cache.get(user_id, key)
            if hit is not None:
                return Filled(hit.value, hit)
            flight = self._flights.get((user_id, key))
            if flight is None or followed >= self._max_follows:
                return await self._fill(cache, user_id, key, fill)
            followed += 1
            await flight.done.wait()
            if flight.hit is not None:
                return Filled(flight.hit.value, flight.hit)
            if flight.completed and flight.value is None:
                return Filled(None, None)

    async def _fill(self, cache: UserCache, user_id: uuid.UUID, key: str, fill: Fill) -> Filled:
        flight = _Flight(trio.Event())
        slot = (user_id, key)
        leader = slot not in self._flights  # else a caller past max_follows: fill alone
        if leader:
            self._flights[slot] = flight
        try:
            generation = await cache.generation(user_id)
            value = await fill()
            if value is not None:
                flight.hit = await cache.set(user_id, key, value, generation)
            flight.value, flight.completed = value, True
            return Filled(value, None)
        finally:
            if leader:
                del self._flights[slot]
            flight.done.set()

    def __len__(self) -> int:
        """The number of fills in flight."""
        return len(self._flights)


class MemoryUserCache:
    """One process's cache: entries expire ``ttl_seconds`` after they are stored.

    ``ttl_seconds`` of 0 disables it (nothing is stored, every read misses and reads the
    source itself: no fills are shared either). ``clock``
    returns wall-clock seconds; tests pass one they move by hand. At most ``max_entries``
    entries are kept: past that, expired ones go first, then the oldest users' entries.
    """

    _MAX_STAMPS = 100_000

    def __init__(
        self,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        *,
        max_entries: int = 100_000,
    ) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[uuid.UUID, dict[str, CacheHit]] = {}
        self._size = 0
        # Invalidation stamps from one counter. A fill is stale when its user's stamp is
        # newer than the generation it took. Forgetting stamps (to bound memory) raises
        # ``_floor``, which fails every fill that started before: safe, merely wasteful.
        self._counter = itertools.count(1)
        self._latest = 0
        self._stamps: dict[uuid.UUID, int] = {}
        self._floor = 0
        self.flights = SingleFlight()

    @property
    def enabled(self) -> bool:
        return self._ttl > 0

    async def generation(self, user_id: uuid.UUID) -> int:
        return self._latest

    async def get(self, user_id: uuid.UUID, key: str) -> CacheHit | None:
        entries = self._entries.get(user_id)
        if entries is None:
            return None
        hit = entries.get(key)
        if hit is None:
            return None
        if hit.expires_at <= self._clock():
            self._drop(user_id, key)
            return None
        return hit

    async def set(
        self, user_id: uuid.UUID, key: str, value: Any, generation: int
    ) -> CacheHit | None:
        if not self.enabled:
            return None
        if max(self._floor, self._stamps.get(user_id, 0)) > generation:
            return None
        hit = CacheHit(value, self._clock() + self._ttl)
        entries = self._entries.setdefault(user_id, {})
        if key not in entries:
            self._size += 1
        entries[key] = hit
        if self._size > self._max_entries:
            self._shrink()
        return hit

    async def invalidate(self, user_ids: Iterable[uuid.UUID]) -> None:
        stamp = next(self._counter)
        self._latest = stamp
        if len(self._stamps) >= self._MAX_STAMPS:
            self._stamps.clear()
            self._floor = stamp
        for user_id in user_ids:
            self._stamps[user_id] = stamp
            entries = self._entries.pop(user_id, None)
            if entries is not None:
                self._size -= len(entries)

    async def get_or_fill(self, user_id: uuid.UUID, key: str, fill: Fill) -> Filled:
        if not self.enabled:
            return Filled(await fill(), None)
        return await self.flights.get_or_fill(self, user_id, key, fill)

    def __len__(self) -> int:
        return self._size

    def _drop(self, user_id: uuid.UUID, key: str) -> None:
        entries = self._entries[user_id]
        del entries[key]
        self._size -= 1
        if not entries:
            del self._entries[user_id]

    def _shrink(self) -> None:
        now = self._clock()
        for user_id, entries in list(self._entries.items()):
            for key, hit in list(entries.items()):
                if hit.expires_at <= now:
                    self._drop(user_id, key)
        while self._size > self._max_entries:
            oldest = next(iter(self._entries))
            self._size -= len(self._entries.pop(oldest))


_UNKNOWN = -1
"""The generation of a user when Redis cannot be asked: nothing is stored under it."""


class SharedUserCache:
    """A per-user cache whose invalidations reach every process sharing Redis.

    Values stay in this process (a ``MemoryUserCache``: same TTL, same bound) together
    with the user's generation in Redis (``Generations``) when they were read; a value is
    served only while that generation is unchanged, and ``invalidate`` changes it for
    every process. So a read after a write is never stale, whichever process served the
    write: one small round trip per hit instead of the source's query (``get_then_hit``
    counts a rate-limit hit in that same round trip). While Redis cannot be reached,
    nothing is stored or served (every read goes to the source); the invalidations made
    meanwhile are recorded in Redis once it answers again.
    """

    def __init__(
        self,
        generations: Generations,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        *,
        max_entries: int = 100_000,
    ) -> None:
        self._generations = generations
        self._entries = MemoryUserCache(ttl_seconds, clock, max_entries=max_entries)
        self._unrecorded: set[uuid.UUID] = set()  # invalidated here, not yet in Redis
        self.flights = SingleFlight()

    @property
    def enabled(self) -> bool:
        return self._entries.enabled

    async def generation(self, user_id: uuid.UUID) -> int:
        try:
            await self._record()
            return await self._generations.current(user_id)
        except RedisUnavailable:
            return _UNKNOWN

    async def get(self, user_id: uuid.UUID, key: str) -> CacheHit | None:
        hit = await self._entries.get(user_id, key)
        if hit is None:
            return None
        generation, value = hit.value
        if generation != await self.generation(user_id):
            await self._entries.invalidate([user_id])
            return None
        return CacheHit(value, hit.expires_at)

    async def get_then_hit(
        self, user_id: uuid.UUID, key: str, hit: RateHit
    ) -> tuple[CacheHit, Window] | None:
        """``get``, and ``hit`` counted in the same round trip (one script) when it finds
        a live entry: the entry and the hit's window, or None with nothing counted (no
        entry here, or the user was invalidated since it was read: it is dropped).
        Raises RedisUnavailable (nothing counted; the entry is dropped, as ``get`` does
        while Redis is away)."""
        found = await self._entries.get(user_id, key)
        if found is None:
            return None
        generation, value = found.value
        try:
            await self._record()
            window = await self._generations.confirm_then_hit(user_id, generation, hit)
        except RedisUnavailable:
            await self._entries.invalidate([user_id])
            raise
        if window is None:
            await self._entries.invalidate([user_id])
            return None
        return CacheHit(value, found.expires_at), window

    async def set(
        self, user_id: uuid.UUID, key: str, value: Any, generation: int
    ) -> CacheHit | None:
        if generation == _UNKNOWN or generation != await self.generation(user_id):
            return None  # Redis away, or the user was invalidated since the read began
        local = await self._entries.generation(user_id)
        stored = await self._entries.set(user_id, key, (generation, value), local)
        return None if stored is None else CacheHit(value, stored.expires_at)

    async def invalidate(self, user_ids: Iterable[uuid.UUID]) -> None:
        users = list(user_ids)
        await self._entries.invalidate(users)
        self._unrecorded.update(users)
        try:
            await self._record()
        except RedisUnavailable as error:
            log.warning("cache invalidation kept for when Redis answers: %s", error)

    async def get_or_fill(self, user_id: uuid.UUID, key: str, fill: Fill) -> Filled:
        if not self.enabled:
            return Filled(await fill(), None)
        return await self.flights.get_or_fill(self, user_id, key, fill)

    def __len__(self) -> int:
        return len(self._entries)

    async def _record(self) -> None:
        """Change the generations of the users invalidated while Redis was away."""
        if self._unrecorded:
            users = list(self._unrecorded)
            await self._generations.bump(users)
            self._unrecorded.difference_update(users)
