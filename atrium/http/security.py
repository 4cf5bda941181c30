"""Bearer-token authentication and per-user rate limiting for API routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from quart import current_app, g, request

from ..domain.accounts import RateLimited, SessionEnded, SignedIn, User
from ..domain.services import Services
from ..identity.ratelimit import RateDecision
from ..identity.tokens import Claims, TokenError
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


async def sign_in(svc: Services, authorization: str) -> SignedIn:
    """Verify the bearer token of an ``Authorization`` header value and its session, and
    count the request against the user's rate limit (``svc.accounts.sign_in``).

    Raises ``ApiError``: 401 (no, a bad or an expired token; a revoked session) or 429
    (rate limited, with its headers); ``DatabaseUnavailable`` when the session must be
    looked up and cannot be. Framework-free: the Quart routes (``require_user``) and the
    plain ASGI routes (``hot.py``) both authenticate here.
    """
    try:
        return await svc.accounts.sign_in(bearer_token(authorization))
    except TokenError as error:
        raise ApiError(
            401, error.code, error.message, headers={"WWW-Authenticate": "Bearer"}
        ) from None
    except SessionEnded:
        raise ApiError(
            401,
            "session_revoked",
            "This session has ended; log in again",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None
    except RateLimited as limited:
        raise rate_limited(limited.decision) from None


async def authenticate() -> tuple[User, Claims]:
    """``sign_in`` for the current Quart request; its rate headers go on the response."""
    signed = await sign_in(services(), request.headers.get("Authorization", ""))
    note_rate(signed.rate)
    return signed.user, signed.claims


def require_user(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Route decorator: 401 unless a valid access token is given; sets ``g.user``, ``g.claims``."""

    @wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.user, g.claims = await authenticate()
        return await func(*args, **kwargs)

    return wrapper
