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
from .passwords import Passwords
from .persistence.database import Database
from .ratelimit import LoginBackoff, MemoryRateLimiter, RateLimiter
from .tokens import TokenCodec, VerifiedTokens

if TYPE_CHECKING:
    from .realtime import Realtime
    from .supervision import Supervisor


class EventPublisher(Protocol):
    """Where project events go once their transaction has committed (live workspaces)."""

    async def publish(self, project_id: uuid.UUID, events: list[dict[str, Any]]) -> None:
        """Deliver ``events`` (in ``seq`` order) to whoever follows ``project_id``."""
        ...


class SessionRevoker(Protocol):
    """Ends a login session's live connections (``Realtime.revoke_session``)."""

    def __call__(self, session_id: uuid.UUID) -> int:
        """Close the open WebSockets of ``session_id`` (4001); return how many."""
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
    ``session_cache`` remembers live sessions for SESSION_CACHE_SECONDS;
    ``revoke_live_session`` closes a revoked session's open WebSockets in this process;
    ``passwords`` bounds argon2 work process-wide; ``login_backoff`` slows logins to an
    email that keeps failing; ``failures`` counts the requests and connections that ended
    in an unexpected exception.
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
    revoke_live_session: SessionRevoker = field(default=lambda session_id: 0)
    passwords: Passwords = field(default_factory=lambda: Passwords(1, 2.0))
    login_backoff: LoginBackoff = field(default_factory=lambda: LoginBackoff(5, 30))
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
        passwords=Passwords(
            settings.password_hash_concurrency, settings.password_hash_queue_seconds
        ),
        login_backoff=LoginBackoff(
            settings.login_backoff_after_failures, settings.login_backoff_max_seconds, clock
        ),
    )
