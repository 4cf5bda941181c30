"""Bearer-token authentication and per-user rate limiting for API routes."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import ParamSpec, TypeVar

from quart import current_app, g, request

from ..core.logs import bind
from ..domain.services import Services
from ..identity.cache import Fill
from ..identity.ratelimit import RateDecision
from ..identity.tokens import Claims, TokenError
from ..persistence import accounts
from ..persistence.accounts import User
from .errors import ApiError

P = ParamSpec("P")
R = TypeVar("R")


def services() -> Services:
    """The services of the app handling the current request."""
    return current_app.extensions["atrium"]  # type: ignore[no-any-return]


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer`` header value (401 token_missing without one)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "token_missing",
            "An Authorization: Bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def rate_limited(decision: RateDecision) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"Too many requests; retry in {decision.retry_after} s",
        headers=decision.headers(),
    )


def note_rate(decision: RateDecision) -> None:
    """Remember the decision so the response carries its X-RateLimit-* headers."""
    g.rate_decision = decision


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who made an authenticated request, and its count against the user's rate limit."""

    user: User
    claims: Claims
    rate: RateDecision


async def sign_in(svc: Services, authorization: str) -> SignedIn:
    """Verify the bearer token of an ``Authorization`` header value and its session, and
    count the request against the user's rate limit (``svc.admission``: with Redis, one
    round trip when the session is cached).

    Raises ``ApiError``: 401 (no, a bad or an expired token; a revoked session) or 429
    (rate limited, with its headers); ``DatabaseUnavailable`` when the session must be
    looked up and cannot be. Framework-free: the Quart routes (``require_user``) and the
    plain ASGI routes (``hot.py``) both authenticate here.
    """
    try:
        claims = svc.verified_tokens.verify(bearer_token(authorization), expected="access")
    except TokenError as error:
        raise ApiError(
            401, error.code, error.message, headers={"WWW-Authenticate": "Bearer"}
        ) from None
    admitted = await svc.admission.admit(
        claims.user_id,
        str(claims.session_id),
        _session_fill(svc, claims),
        rate_key=f"user:{claims.user_id}",
        limit=svc.settings.rate_limit_per_minute,
    )
    if admitted is None:
        raise ApiError(
            401,
            "session_revoked",
            "This session has ended; log in again",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user = User(
        claims.user_id,
        admitted.value["email"],
        admitted.value["role"],
        datetime.fromisoformat(admitted.value["created_at"]),
    )
    bind(user_id=str(user.id))  # this request's log lines, from here on
    if not admitted.rate.allowed:
        raise rate_limited(admitted.rate)
    return SignedIn(user, claims, admitted.rate)


async def authenticate() -> tuple[User, Claims]:
    """``sign_in`` for the current Quart request; its rate headers go on the response."""
    signed = await sign_in(services(), request.headers.get("Authorization", ""))
    note_rate(signed.rate)
    return signed.user, signed.claims


def _session_fill(svc: Services, claims: Claims) -> Fill:
    """Reads the user of a live session from the database for the session cache (None
    when the session was revoked or has expired).

    Revocations invalidate the cache at once (``forget_sessions``): on every instance
    with Redis (a shared cache), else on this one, and another instance's revocation is
    seen within SESSION_CACHE_SECONDS.
    """

    async def fill() -> dict[str, str] | None:
        user = await accounts.find_session_user(svc.db, claims.user_id, claims.session_id)
        if user is None:
            return None
        return {"email": user.email, "role": user.role, "created_at": user.created_at.isoformat()}

    return fill


async def forget_sessions(user_id: uuid.UUID) -> None:
    """Drop the user's cached sessions (after a revocation)."""
    await services().session_cache.invalidate([user_id])


def require_user(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Route decorator: 401 unless a valid access token is given; sets ``g.user``, ``g.claims``."""

    @wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.user, g.claims = await authenticate()
        return await func(*args, **kwargs)

    return wrapper
