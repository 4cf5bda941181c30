"""Per-user read caches with a TTL, behind an interface a Redis-backed cache can implement.

Entries belong to a user and are found by a key (e.g. one page of that user's project
list). ``invalidate(user_ids)`` drops everything of those users at once.

A fill races with invalidation: a reader that loaded data before a write committed may try
to store it after the writer invalidated. So a reader takes a ``generation`` token before
it reads the database and hands it to ``set``; ``set`` refuses the value when any of the
user's entries was invalidated after that token was taken. A read after a write therefore
never sees the data from before the write.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A cached value and when it expires (wall-clock epoch seconds)."""

    value: Any
    expires_at: float


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


class MemoryUserCache:
    """One process's cache: entries expire ``ttl_seconds`` after they are stored.

    ``ttl_seconds`` of 0 disables it (nothing is stored, every read misses). ``clock``
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
