"""The long-lived objects request handlers use, built once per process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Settings
from .persistence.database import Database
from .ratelimit import MemoryRateLimiter, RateLimiter
from .tokens import TokenCodec


@dataclass(slots=True)
class Services:
    """What the HTTP layer needs: settings, the database, tokens, limits and a clock.

    ``clock`` (wall-clock seconds) drives rate-limit windows; tests substitute their own.
    """

    settings: Settings
    db: Database
    tokens: TokenCodec
    limiter: RateLimiter
    clock: Callable[[], float] = field(default=time.time)


def build_services(
    settings: Settings, db: Database, *, clock: Callable[[], float] = time.time
) -> Services:
    """Assemble the services for ``settings`` on an open database."""
    codec = TokenCodec(
        secret=settings.secret_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl_seconds=settings.access_token_expire_minutes * 60,
        refresh_ttl_seconds=settings.refresh_token_expire_days * 86400,
    )
    return Services(settings, db, codec, MemoryRateLimiter(clock), clock)
