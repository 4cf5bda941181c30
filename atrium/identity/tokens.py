"""JWT access and refresh tokens (HS256) with stable error codes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jwt

TokenType = Literal["access", "refresh"]
_ALGORITHM = "HS256"


class TokenError(Exception):
    """A token was refused; ``code`` is stable and safe to show to clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of a token."""

    user_id: uuid.UUID
    email: str
    role: str
    session_id: uuid.UUID
    jti: uuid.UUID
    type: TokenType
    issued_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class TokenCodec:
    """Issues and verifies tokens for one secret, issuer and audience."""

    secret: str
    issuer: str
    audience: str
    access_ttl_seconds: int
    refresh_ttl_seconds: int

    def issue(
        self,
        *,
        type: TokenType,
        user_id: uuid.UUID,
        email: str,
        role: str,
        session_id: uuid.UUID,
        jti: uuid.UUID | None = None,
        now: float | None = None,
    ) -> tuple[str, Claims]:
        """Sign a new token; return it with its claims."""
        issued = int(time.time() if now is None else now)
        ttl = self.access_ttl_seconds if type == "access" else self.refresh_ttl_seconds
        claims = Claims(
            user_id=user_id,
            email=email,
            role=role,
            session_id=session_id,
            jti=jti or uuid.uuid4(),
            type=type,
            issued_at=issued,
            expires_at=issued + ttl,
        )
        payload: dict[str, Any] = {
            "sub": str(user_id),
            "email": email,
            "role": role,
            "iat": issued,
            "exp": claims.expires_at,
            "aud": self.audience,
            "iss": self.issuer,
            "jti": str(claims.jti),
            "sid": str(session_id),
            "typ": type,
        }
        return jwt.encode(payload, self.secret, algorithm=_ALGORITHM), claims

    def verify(self, token: str, *, expected: TokenType) -> Claims:
        """Return the claims of a valid token of type ``expected``.

        Raises ``TokenError`` with code token_expired, token_invalid_signature,
        token_invalid_audience, token_invalid_issuer, token_malformed or token_wrong_type.
        """
        try:
            payload = jwt.decode(
                token,
                self.secret,
                algorithms=[_ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["sub", "exp", "iat", "aud", "iss", "jti", "sid", "typ"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "The token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token_invalid_signature", "The token signature is invalid") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token_invalid_audience", "The token is not for this API") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token_invalid_issuer", "The token was not issued here") from None
        except jwt.PyJWTError:
            raise TokenError("token_malformed", "The token is malformed") from None
        if payload["typ"] != expected:
            raise TokenError("token_wrong_type", f"An {expected} token is required")
        try:
            return Claims(
                user_id=uuid.UUID(payload["sub"]),
                email=str(payload.get("email", "")),
                role=str(payload.get("role", "user")),
                session_id=uuid.UUID(payload["sid"]),
                jti=uuid.UUID(payload["jti"]),
                type=expected,
                issued_at=int(payload["iat"]),
                expires_at=int(payload["exp"]),
            )
        except (ValueError, TypeError, AttributeError):  # uuid.UUID(12): AttributeError
            raise TokenError("token_malformed", "The token is malformed") from None


class VerifiedTokens:
    """Remembers the tokens this process has verified, so each is checked (HMAC, claims)
    once: a hit costs a dict lookup and an expiry check. Bounded: it starts afresh when
    full. Revocation is not a token property; callers still check the session.
    """

    __slots__ = ("_codec", "_entries", "_max_entries")

    def __init__(self, codec: TokenCodec, max_entries: int = 10_000) -> None:
        self._codec = codec
        self._entries: dict[str, Claims] = {}
        self._max_entries = max_entries

    def verify(self, token: str, *, expected: TokenType) -> Claims:
        """As ``TokenCodec.verify``; raises the same ``TokenError`` codes."""
        claims = self._entries.get(token)
        if claims is not None and claims.type == expected and claims.expires_at > time.time():
            return claims
        claims = self._codec.verify(token, expected=expected)
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[token] = claims
        return claims
