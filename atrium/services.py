"""The long-lived objects request handlers use, built once per process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .cache import MemoryUserCache, UserCache
from .config import Settings
from .failures import ContainedFailures
from .persistence.database import Database
from .ratelimit import MemoryRateLimiter, RateLimiter
from .tokens import TokenCodec, VerifiedTokens

if TYPE_CHECKING:
    from .session import Realtime
    from .supervision import Supervisor


class EventPublisher(Protocol):
    """Where project events go once their transaction has committed (live workspaces)."""

    async def publish(self, project_id: uuid.UUID, events: list[dict[str, Any]]) -> None:
        """Deliver ``events`` (in ``seq`` order) to whoever follows ``project_id``."""
        ...


class NoPublisher:
    """An ``EventPublisher`` that delivers nowhere (no live workspaces attached)."""

    async def publish(self, project_id: uuid.UUID, events: list[dict[str, Any]]) -> None:
        return None


@dataclass(slots=True)
class Services:
    """What the HTTP layer needs: settings, the database, tokens, limits and a clock.

    ``clock`` (wall-clock seconds) drives rate-limit windows and cache expiry; tests
    substitute their own. ``project_cache`` holds each user's project-list pages;
    ``publish`` receives every project event after its transaction commits;
    ``realtime`` serves workspace WebSockets; ``supervisor`` is the process's root;
    ``session_cache`` remembers live sessions for SESSION_CACHE_SECONDS; ``failures``
    counts the requests and connections that ended in an unexpected exception.
    """

    settings: Settings
    db: Database
    tokens: TokenCodec
    limiter: RateLimiter
    clock: Callable[[], float] = field(default=time.time)
    project_cache: UserCache = field(default_factory=lambda: MemoryUserCache(0))
    publish: EventPublisher = field(default_factory=NoPublisher)
    session_cache: UserCache = field(default_factory=lambda: MemoryUserCache(0))
    verified_tokens: VerifiedTokens | None = None
    realtime: Realtime | None = None
    supervisor: Supervisor | None = None
    failures: ContainedFailures = field(default_factory=ContainedFailures)


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
    cache = MemoryUserCache(settings.project_cache_ttl_seconds, clock)
    sessions = MemoryUserCache(settings.session_cache_seconds, clock)
    return Services(
        settings,
        db,
        codec,
        MemoryRateLimiter(clock),
        clock,
        project_cache=cache,
        session_cache=sessions,
        verified_tokens=VerifiedTokens(codec),
    )
