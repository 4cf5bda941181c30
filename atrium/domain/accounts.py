"""The accounts service: signing up, logging in, refreshing, logging out and signing a
request in, the sequences that span identity (limits, backoff, password hashing, tokens,
admission) and persistence (users and login sessions).

The HTTP views (``http/auth.py``) and the plain ASGI routes (``http/hot.py``, through
``sign_in``) call it and turn its refusals into responses; nothing here knows HTTP. A
refusal is an ``AccountError`` subclass carrying what the response needs (the rate
decision, the seconds to wait); ``HashingBusy`` (password hashing saturated),
``TokenError`` and ``DatabaseUnavailable`` pass through as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..core.config import Settings
from ..core.emails import email_key
from ..core.logs import bind
from ..identity.admission import Admission
from ..identity.cache import Fill, UserCache
from ..identity.passwords import Passwords
from ..identity.ratelimit import LoginBackoff, RateDecision, RateLimiter
from ..identity.sessions import SessionEnds
from ..identity.tokens import Claims, TokenCodec, VerifiedTokens
from ..persistence import accounts
from ..persistence.accounts import Rotation
from ..persistence.accounts import User as User
from ..persistence.database import Database

# Told the decision of an auth attempt's rate limits (the view puts it on the response).
Counted = Callable[[RateDecision], None]


class AccountError(Exception):
    """A refusal of the accounts service."""


class RateLimited(AccountError):
    """An attempt's count exhausted a limit (``decision`` says which and until when)."""

    def __init__(self, decision: RateDecision) -> None:
        super().__init__(decision)
        self.decision = decision


class LoginBackedOff(AccountError):
    """Logins to this email failed repeatedly: the next may come in ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class BadCredentials(AccountError):
    """A wrong email or a wrong password (the two are not told apart)."""


class EmailTaken(AccountError):
    """An account's email already normalises alike."""


class SessionEnded(AccountError):
    """The login session was revoked or has expired."""


class RefreshReused(AccountError):
    """A refresh token was presented again after rotation: the session is now revoked."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a login or a refresh hands the client."""

    user_id: uuid.UUID
    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who made an authenticated request, and its count against the user's rate limit."""

    user: User
    claims: Claims
    rate: RateDecision


class Accounts:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        tokens: TokenCodec,
        verified_tokens: VerifiedTokens,
        limiter: RateLimiter,
        passwords: Passwords,
        login_backoff: LoginBackoff,
        admission: Admission,
        session_cache: UserCache,
        session_ends: SessionEnds,
    ) -> None:
        self._settings = settings
        self._db = db
        self._tokens = tokens
        self._verified_tokens = verified_tokens
        self._limiter = limiter
        self._passwords = passwords
        self._login_backoff = login_backoff
        self._admission = admission
        self._session_cache = session_cache
        self._session_ends = session_ends

    async def _limit(self, counted: Counted, *limits: tuple[str, int]) -> None:
        """Count an auth attempt against every ``(key, limit)``; ``counted`` gets the
        tightest decision (the response's rate headers, whatever follows), and
        ``RateLimited`` carries it when any limit is exhausted."""
        decisions = [await self._limiter.hit(f"auth:{key}", limit) for key, limit in limits]
        tightest = min(decisions, key=lambda d: (d.allowed, d.remaining))
        counted(tightest)
        if not tightest.allowed:
            raise RateLimited(tightest)

    async def signup(self, email: str, password: str, address: str, counted: Counted) -> User:
        """Create an account (limited per client address); ``EmailTaken`` when one exists."""
        await self._limit(
            counted, (f"signup:ip:{address}", self._settings.auth_rate_limit_per_minute)
        )
        password_hash = await self._passwords.hash(password)
        user = await accounts.create_user(self._db, email, password_hash)
        if user is None:
            raise EmailTaken(email)
        return user

    async def login(self, email: str, password: str, address: str, counted: Counted) -> TokenPair:
        """Check the limits (per address and email pair, per address), the email's backoff
        and the password; open a login session and issue its token pair."""
        key = email_key(email)
        await self._limit(
            counted,
            (f"login:pair:{address}:{key}", self._settings.auth_rate_limit_per_minute),
            (f"login:ip:{address}", self._settings.auth_address_rate_limit_per_minute),
        )
        if wait := await self._login_backoff.retry_after(key):
            raise LoginBackedOff(wait)
        found = await accounts.find_credentials(self._db, email)
        valid = await self._passwords.verify(found.password_hash if found else None, password)
        if found is None or not valid:
            await self._login_backoff.failed(key)
            raise BadCredentials()
        await self._login_backoff.succeeded(key)
        session_id = uuid.uuid4()
        access, refresh, refresh_jti, refresh_expiry = self._issue_pair(found.user, session_id)
        await accounts.open_session(
            self._db, found.user.id, session_id, refresh_jti, refresh_expiry
        )
        return TokenPair(found.user.id, access, refresh, self._tokens.access_ttl_seconds)

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate a refresh token (``TokenError`` when it is bad or expired). Presenting one
        already rotated revokes the whole session: ``RefreshReused``."""
        claims = self._tokens.verify(refresh_token, expected="refresh")
        user = await accounts.find_user(self._db, claims.user_id)
        if user is None:
            raise SessionEnded()
        access, new_refresh, new_jti, new_expiry = self._issue_pair(user, claims.session_id)
        outcome = await accounts.rotate_refresh_token(
            self._db, claims.session_id, claims.jti, new_jti, new_expiry
        )
        if outcome is Rotation.REUSED:
            await self._session_ended(claims.user_id, claims.session_id)
            raise RefreshReused()
        if outcome is not Rotation.ROTATED:
            raise SessionEnded()
        return TokenPair(user.id, access, new_refresh, self._tokens.access_ttl_seconds)

    async def logout(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        """End the session: its tokens stop working and its WebSockets close."""
        await accounts.revoke_session(self._db, session_id, "logout")
        await self._session_ended(user_id, session_id)

    async def sign_in(self, access_token: str) -> SignedIn:
        """Verify an access token (``TokenError``) and its session (``SessionEnded`` when
        revoked), and count the request against the user's rate limit (``admission``: with
        Redis, one round trip when the session is cached): ``RateLimited`` when it is spent.
        From the moment the user is known, the request's log lines name them."""
        claims = self._verified_tokens.verify(access_token, expected="access")
        admitted = await self._admission.admit(
            claims.user_id,
            str(claims.session_id),
            self._session_fill(claims),
            rate_key=f"user:{claims.user_id}",
            limit=self._settings.rate_limit_per_minute,
        )
        if admitted is None:
            raise SessionEnded()
        user = User(
            claims.user_id,
            admitted.value["email"],
            admitted.value["role"],
            datetime.fromisoformat(admitted.value["created_at"]),
        )
        bind(user_id=str(user.id))  # this request's log lines, from here on
        if not admitted.rate.allowed:
            raise RateLimited(admitted.rate)
        return SignedIn(user, claims, admitted.rate)

    def _issue_pair(
        self, user: User, session_id: uuid.UUID
    ) -> tuple[str, str, uuid.UUID, datetime]:
        access, _ = self._tokens.issue(
            type="access", user_id=user.id, email=user.email, role=user.role, session_id=session_id
        )
        refresh, claims = self._tokens.issue(
            type="refresh", user_id=user.id, email=user.email, role=user.role, session_id=session_id
        )
        return access, refresh, claims.jti, datetime.fromtimestamp(claims.expires_at, UTC)

    async def _session_ended(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        """After a session's revocation committed: no cached copy of it is trusted any more,
        and its WebSockets close at once (on every process, with Redis)."""
        await self._session_cache.invalidate([user_id])
        await self._session_ends.ended(session_id)

    def _session_fill(self, claims: Claims) -> Fill:
        """Reads the user of a live session from the database for the session cache (None
        when the session was revoked or has expired).

        Revocations invalidate the cache at once (``_session_ended``): on every instance
        with Redis (a shared cache), else on this one, and another instance's revocation is
        seen within SESSION_CACHE_SECONDS.
        """
        db = self._db

        async def fill() -> dict[str, str] | None:
            user = await accounts.find_session_user(db, claims.user_id, claims.session_id)
            if user is None:
                return None
            return {
                "email": user.email,
                "role": user.role,
                "created_at": user.created_at.isoformat(),
            }

        return fill
