"""``/api/v1/auth``: signup, login, token refresh with rotation, logout, me."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from quart import Blueprint, Response, g, request
from quart_schema import document_response, security_scheme, tag, validate_request

from ..core.emails import email_key
from ..identity.passwords import HashingBusy
from ..identity.proxies import client_address
from ..identity.tokens import TokenError
from ..persistence import accounts
from ..persistence.accounts import Rotation, User
from .errors import ApiError
from .schemas import (
    JSON_BODY,
    SIGNED_IN,
    LoginRequest,
    LoginResponse,
    MessageResponse,
    RefreshRequest,
    SignupRequest,
    SignupResponse,
    TokenResponse,
    UserResponse,
    error_responses,
    respond,
)
from .security import forget_sessions, note_rate, rate_limited, require_user, services

blueprint = Blueprint("auth", __name__, url_prefix="/api/v1/auth")

_BAD_CREDENTIALS = ApiError(401, "invalid_credentials", "Wrong email or password")


def _client_address() -> str:
    """The peer's address, or the client's behind a TRUSTED_PROXIES hop (X-Forwarded-For)."""
    return client_address(
        request.remote_addr or "unknown",
        request.headers.getlist("X-Forwarded-For"),
        services().settings.trusted_proxies,
    )


async def _limit_auth(*limits: tuple[str, int]) -> None:
    """Count an auth attempt against every ``(key, limit)``; 429 when any is exhausted."""
    svc = services()
    decisions = [await svc.limiter.hit(f"auth:{key}", limit) for key, limit in limits]
    tightest = min(decisions, key=lambda d: (d.allowed, d.remaining))
    note_rate(tightest)
    if not tightest.allowed:
        raise rate_limited(tightest)


def _server_busy(error: HashingBusy) -> ApiError:
    return ApiError(
        503,
        "server_busy",
        f"Too many logins at once; retry in {error.retry_after} s",
        headers={"Retry-After": str(error.retry_after)},
    )


async def _issue_pair(user: User, session_id: uuid.UUID) -> tuple[str, str, uuid.UUID, datetime]:
    codec = services().tokens
    access, _ = codec.issue(
        type="access", user_id=user.id, email=user.email, role=user.role, session_id=session_id
    )
    refresh, claims = codec.issue(
        type="refresh", user_id=user.id, email=user.email, role=user.role, session_id=session_id
    )
    return access, refresh, claims.jti, datetime.fromtimestamp(claims.expires_at, UTC)


async def _session_ended(user_id: uuid.UUID, session_id: uuid.UUID) -> None:
    """After a session's revocation committed: no cached copy of it is trusted any more,
    and its WebSockets close at once (on every process, with Redis)."""
    await forget_sessions(user_id)
    await services().session_ends.ended(session_id)


@blueprint.post("/signup")
@tag(["auth"])
@validate_request(SignupRequest)
@document_response(SignupResponse, 201)
@error_responses(*JSON_BODY, 409, 429, 503)
async def signup(data: SignupRequest) -> Response:
    """Create an account. 409 email_taken when an account's email normalises alike.

    Limited per client address (AUTH_RATE_LIMIT_PER_MINUTE); 503 server_busy when password
    hashing stays saturated for PASSWORD_HASH_QUEUE_SECONDS.
    """
    svc = services()
    await _limit_auth((f"signup:ip:{_client_address()}", svc.settings.auth_rate_limit_per_minute))
    try:
        password_hash = await svc.passwords.hash(data.password)
    except HashingBusy as busy:
        raise _server_busy(busy) from None
    user = await accounts.create_user(svc.db, str(data.email), password_hash)
    if user is None:
        raise ApiError(409, "email_taken", "An account with this email already exists")
    return respond(SignupResponse(message="Signup successful", user_id=user.id), 201)


@blueprint.post("/login")
@tag(["auth"])
@validate_request(LoginRequest)
@document_response(LoginResponse, 200)
@error_responses(*JSON_BODY, 401, 429, 503)
async def login(data: LoginRequest) -> Response:
    """Exchange email and password for an access and a refresh token.

    Hard limits: AUTH_RATE_LIMIT_PER_MINUTE per (client address, email) pair and
    AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE per address. Softer, per email from any address:
    after LOGIN_BACKOFF_AFTER_FAILURES failures each attempt waits a doubling delay (at
    most LOGIN_BACKOFF_MAX_SECONDS) after the last failure; a success clears it. All three
    refuse with 429 rate_limited and Retry-After. A wrong email and a wrong password give
    the same 401 invalid_credentials; 503 server_busy when hashing stays saturated.
    """
    svc = services()
    address, key = _client_address(), email_key(data.email)
    await _limit_auth(
        (f"login:pair:{address}:{key}", svc.settings.auth_rate_limit_per_minute),
        (f"login:ip:{address}", svc.settings.auth_address_rate_limit_per_minute),
    )
    if wait := await svc.login_backoff.retry_after(key):
        raise ApiError(
            429,
            "rate_limited",
            f"Too many failed logins for this account; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    found = await accounts.find_credentials(svc.db, data.email)
    try:
        valid = await svc.passwords.verify(found.password_hash if found else None, data.password)
    except HashingBusy as busy:
        raise _server_busy(busy) from None
    if found is None or not valid:
        await svc.login_backoff.failed(key)
        raise _BAD_CREDENTIALS
    await svc.login_backoff.succeeded(key)
    session_id = uuid.uuid4()
    access, refresh, refresh_jti, refresh_expiry = await _issue_pair(found.user, session_id)
    await accounts.open_session(svc.db, found.user.id, session_id, refresh_jti, refresh_expiry)
    return respond(
        LoginResponse(
            user_id=found.user.id,
            access_token=access,
            refresh_token=refresh,
            token_type="bearer",
            expires_in=svc.tokens.access_ttl_seconds,
        )
    )


@blueprint.post("/refresh")
@tag(["auth"])
@validate_request(RefreshRequest)
@document_response(TokenResponse, 200)
@error_responses(*JSON_BODY, 401, 503)
async def refresh(data: RefreshRequest) -> Response:
    """Rotate a refresh token: the presented one stops working, a new pair is returned.

    Presenting a token that was already rotated revokes the whole session (401
    refresh_token_reused): every token descended from that login stops working, and the
    session's open WebSockets close (4001 session_revoked).
    """
    svc = services()
    try:
        claims = svc.tokens.verify(data.refresh_token, expected="refresh")
    except TokenError as error:
        raise ApiError(401, error.code, error.message) from None
    user = await accounts.find_user(svc.db, claims.user_id)
    if user is None:
        raise ApiError(401, "session_revoked", "This session has ended; log in again")
    access, new_refresh, new_jti, new_expiry = await _issue_pair(user, claims.session_id)
    outcome = await accounts.rotate_refresh_token(
        svc.db, claims.session_id, claims.jti, new_jti, new_expiry
    )
    if outcome is Rotation.REUSED:
        await _session_ended(claims.user_id, claims.session_id)
        raise ApiError(
            401,
            "refresh_token_reused",
            "This refresh token was already used; the session is now revoked",
        )
    if outcome is not Rotation.ROTATED:
        raise ApiError(401, "session_revoked", "This session has ended; log in again")
    return respond(
        TokenResponse(
            access_token=access,
            refresh_token=new_refresh,
            token_type="bearer",
            expires_in=svc.tokens.access_ttl_seconds,
        )
    )


@blueprint.post("/logout")
@tag(["auth"])
@security_scheme([{"bearer": []}])
@document_response(MessageResponse, 200)
@error_responses(*SIGNED_IN)
@require_user
async def logout() -> Response:
    """End the session: this access token and every refresh token of its family stop
    working, and the session's open WebSockets close (4001 session_revoked)."""
    await accounts.revoke_session(services().db, g.claims.session_id, "logout")
    await _session_ended(g.user.id, g.claims.session_id)
    return respond(MessageResponse(message="Logged out"))


@blueprint.get("/me")
@tag(["auth"])
@security_scheme([{"bearer": []}])
@document_response(UserResponse, 200)
@error_responses(*SIGNED_IN)
@require_user
async def me() -> Response:
    """The signed-in user."""
    return respond(me_body(g.user))


def me_body(user: User) -> UserResponse:
    """What ``GET /me`` answers (also served past Quart: ``hot.py``)."""
    return UserResponse(
        user_id=user.id, email=user.email, role=user.role, created_at=user.created_at
    )
