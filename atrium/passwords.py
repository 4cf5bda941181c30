"""Password hashing with argon2id, always off the event loop."""

from __future__ import annotations

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 low-memory profile
# A real hash to verify against when the email is unknown, so a miss costs what a hit costs.
_DUMMY_HASH = _hasher.hash("atrium-timing-equaliser")


async def hash_password(password: str) -> str:
    """Return an argon2id hash of ``password`` (computed in a worker thread)."""
    return await trio.to_thread.run_sync(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored_hash``.

    With ``stored_hash=None`` (no such user) it still spends one verification, so a
    caller cannot tell unknown emails from wrong passwords by timing.
    """

    def check() -> bool:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    return await trio.to_thread.run_sync(check)
