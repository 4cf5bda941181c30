"""Password hashing with argon2id, always off the event loop and bounded process-wide.

Each argon2 computation holds its memory cost (64 MiB with the library's RFC 9106
low-memory profile) for its whole run, so unbounded concurrent logins grow the process by
that much per login in flight. ``Passwords`` lets at most ``concurrency`` run at once, in
threads of its own (not trio's default thread pool, which other work shares); a caller
that cannot start within ``queue_seconds`` gets ``HashingBusy``, which the HTTP layer
answers with 503 ``server_busy`` and ``Retry-After``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

T = TypeVar("T")


class Hasher(Protocol):
    """What ``Passwords`` needs of argon2-cffi's ``PasswordHasher`` (tests wrap it)."""

    def hash(self, password: str) -> str: ...

    def verify(self, hash: str, password: str) -> bool: ...


_hasher: Hasher = PasswordHasher()  # argon2id with the library's RFC 9106 low-memory profile
# A real hash to verify against when the email is unknown, so a miss costs what a hit costs.
_DUMMY_HASH = PasswordHasher().hash("atrium-timing-equaliser")


class HashingBusy(Exception):
    """Every hashing slot stayed taken for the whole queueing time; try again later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"password hashing is saturated; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class HashingStatistics:
    """How busy hashing is right now."""

    concurrency: int
    in_flight: int
    waiting: int


class Passwords:
    """Hash and verify passwords with at most ``concurrency`` computations at once.

    ``hasher`` defaults to the module's argon2id hasher (read when this object is built).
    """

    def __init__(
        self, concurrency: int, queue_seconds: float, hasher: Hasher | None = None
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._hasher = hasher if hasher is not None else _hasher
        self._slots = trio.CapacityLimiter(concurrency)
        # Our own thread limiter, as large as the slots: hashing never waits behind other
        # to_thread users, and never takes their threads either.
        self._threads = trio.CapacityLimiter(concurrency)
        self._queue_seconds = queue_seconds
        self._retry_after = max(1, math.ceil(queue_seconds))

    async def hash(self, password: str) -> str:
        """An argon2id hash of ``password``. Raises ``HashingBusy``."""
        return await self._run(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored_hash``. Raises ``HashingBusy``.

        With ``stored_hash=None`` (no such user) it still spends one verification, so a
        caller cannot tell unknown emails from wrong passwords by timing.
        """
        hasher = self._hasher

        def check(password: str) -> bool:
            try:
                matched = hasher.verify(stored_hash or _DUMMY_HASH, password)
            except (VerificationError, InvalidHashError):
                return False
            return matched and stored_hash is not None

        return await self._run(check, password)

    def statistics(self) -> HashingStatistics:
        """Slots in use and callers queued for one."""
        stats = self._slots.statistics()
        return HashingStatistics(
            concurrency=int(stats.total_tokens),
            in_flight=stats.borrowed_tokens,
            waiting=stats.tasks_waiting,
        )

    async def _run(self, work: Callable[[str], T], password: str) -> T:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self._queue_seconds) as queued:
                await self._slots.acquire()
            if queued.cancelled_caught:
                raise HashingBusy(self._retry_after) from None
        try:
            # Not abandoned on cancel: the slot is held until the thread really ends, so
            # the bound holds even for callers that went away.
            return await trio.to_thread.run_sync(work, password, limiter=self._threads)
        finally:
            self._slots.release()
