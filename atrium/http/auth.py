"""``/api/v1/auth``: signup, login, token refresh with rotation, logout, me. The sequences
are the accounts service's (``domain/accounts.py``); these views parse, call it and turn its
refusals into responses."""

from __future__ import annotations

from quart import Blueprint, Response, g, request
from quart_schema import document_response, security_scheme, tag, validate_request

from ..domain.accounts import (
    BadCredentials,
    EmailTaken,
    LoginBackedOff,
    RateLimited,
    RefreshReused,
    SessionEnded,
    User,
)
from ..identity.passwords import HashingBusy
from ..identity.proxies import client_address
from ..identity.tokens import TokenError
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
from .security import note_rate, rate_limited, require_user, services

blueprint = Blueprint("auth", __name__, url_prefix="/api/v1/auth")

_BAD_CREDENTIALS = ApiError(401, "invalid_credentials", "Wrong email or password")


def _client_address() -> str:
    """The peer's address, or the client's behind a TRUSTED_PROXIES hop (X-Forwarded-For)."""
    return client_address(
        request.remote_addr or "unknown",
        request.headers.getlist("X-Forwarded-For"),
        services().settings.trusted_proxies,
    )


def _refused(error: RateLimited | HashingBusy | LoginBackedOff) -> ApiError:
    """The response to an auth attempt refused for load: 429 or 503, with Retry-After."""
    if isinstance(error, RateLimited):
        return rate_limited(error.decision)
    if isinstance(error, LoginBackedOff):
        return ApiError(
            429,
            "rate_limited",
            f"Too many failed logins for this account; retry in {error.retry_after} s",
            headers={"Retry-After": str(error.retry_after)},
        )
    return _server_busy(error)


_SESSION_ENDED = ApiError(401, "session_revoked", "This session has ended; log in again")


def _server_busy(error: HashingBusy) -> ApiError:
    return ApiError(
        503,
        "server_busy",
        f"Too many logins at once; retry in {error.retry_after} s",
        headers={"Retry-After": str(error.retry_after)},
    )


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
    try:
        user = await services().accounts.signup(
            str(data.email), data.password, _client_address(), note_rate
        )
    except (RateLimited, HashingBusy) as refused:
        raise _refused(refused) from None
    except EmailTaken:
        raise ApiError(409, "email_taken", "An account with this email already exists") from None
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
    try:
        pair = await svc.accounts.login(data.email, data.password, _client_address(), note_rate)
    except (RateLimited, LoginBackedOff, HashingBusy) as refused:
        raise _refused(refused) from None
    except BadCredentials:
        raise _BAD_CREDENTIALS from None
    return respond(
        LoginResponse(
            user_id=pair.user_id,
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            token_type="bearer",
            expires_in=pair.expires_in,
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
    try:
        pair = await services().accounts.refresh(data.refresh_token)
    except TokenError as error:
        raise ApiError(401, error.code, error.message) from None
    except RefreshReused:
        raise ApiError(
            401,
            "refresh_token_reused",
            "This refresh token was already used; the session is now revoked",
        ) from None
    except SessionEnded:
        raise _SESSION_ENDED from None
    return respond(
        TokenResponse(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            token_type="bearer",
            expires_in=pair.expires_in,
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
    await services().accounts.logout(g.user.id, g.claims.session_id)
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
