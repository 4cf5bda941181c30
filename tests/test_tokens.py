"""Access and refresh tokens, issued and verified without a server: every refusal has its
stable code, and the verified-token cache never serves what the codec would refuse."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import jwt
import pytest

from atrium.identity.tokens import Claims, TokenCodec, TokenError, TokenType, VerifiedTokens

SECRET = "unit-test-secret-" + "x" * 48  # 64 bytes: long enough for HS512 too
USER = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
SESSION = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
CODEC = TokenCodec(SECRET, "atrium", "atrium-api", 900, 30 * 24 * 3600)


def issue(codec: TokenCodec = CODEC, type: TokenType = "access", **kwargs: Any) -> str:
    token, _ = codec.issue(
        type=type, user_id=USER, email="ada@example.com", role="user", session_id=SESSION, **kwargs
    )
    return token


def payload(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(USER),
        "email": "ada@example.com",
        "role": "user",
        "iat": now,
        "exp": now + 900,
        "aud": "atrium-api",
        "iss": "atrium",
        "jti": str(uuid.uuid4()),
        "sid": str(SESSION),
        "typ": "access",
    }
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def forge(secret: str = SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    return jwt.encode(payload(**changes), secret, algorithm=algorithm)


def refused(token: str, expected: TokenType = "access", codec: TokenCodec = CODEC) -> str:
    with pytest.raises(TokenError) as caught:
        codec.verify(token, expected=expected)
    assert caught.value.message == str(caught.value)
    return caught.value.code


def test_a_token_verifies_to_the_claims_it_was_issued_with() -> None:
    jti = uuid.uuid4()
    token, issued = CODEC.issue(
        type="access",
        user_id=USER,
        email="ada@example.com",
        role="admin",
        session_id=SESSION,
        jti=jti,
    )
    verified = CODEC.verify(token, expected="access")
    assert verified == issued
    assert (verified.user_id, verified.session_id, verified.jti) == (USER, SESSION, jti)
    assert (verified.email, verified.role, verified.type) == ("ada@example.com", "admin", "access")


def test_lifetimes_follow_the_type_and_the_clock() -> None:
    now = time.time()
    _, access = CODEC.issue(
        type="access", user_id=USER, email="", role="user", session_id=SESSION, now=now
    )
    _, refresh = CODEC.issue(
        type="refresh", user_id=USER, email="", role="user", session_id=SESSION, now=now
    )
    assert access.issued_at == refresh.issued_at == int(now)
    assert access.expires_at == int(now) + 900
    assert refresh.expires_at == int(now) + 30 * 24 * 3600
    # Every token has its own id (refresh rotation and revocation rely on it).
    assert access.jti != refresh.jti


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: issue(now=time.time() - 901), "token_expired"),
        (lambda: forge(exp=int(time.time()) - 1), "token_expired"),
        (
            lambda: forge(secret="another-secret-that-is-long-enough-as-well"),
            "token_invalid_signature",
        ),
        (lambda: forge(aud="someone-else"), "token_invalid_audience"),
        (lambda: forge(iss="someone-else"), "token_invalid_issuer"),
        (
            lambda: issue(TokenCodec(SECRET, "atrium", "other-api", 900, 900)),
            "token_invalid_audience",
        ),
        (
            lambda: issue(TokenCodec(SECRET, "elsewhere", "atrium-api", 900, 900)),
            "token_invalid_issuer",
        ),
        (lambda: issue(type="refresh"), "token_wrong_type"),
        (lambda: forge(typ="magic"), "token_wrong_type"),
        (lambda: "", "token_malformed"),
        (lambda: "not-a-jwt", "token_malformed"),
        (lambda: "a.b.c", "token_malformed"),
        # A signature cut to 41 characters is never valid base64url (a cut to 38 sometimes
        # decodes, and is then a wrong signature instead).
        (lambda: forge()[:-2], "token_malformed"),
        # The algorithm is fixed: "none" and other HMACs with the same secret are refused.
        (lambda: forge(algorithm="HS512"), "token_malformed"),
        (lambda: jwt.encode(payload(), cast(Any, None), algorithm="none"), "token_malformed"),
        # Every claim the API relies on is required, and ids must be ids.
        (lambda: forge(jti=None), "token_malformed"),
        (lambda: forge(sid=None), "token_malformed"),
        (lambda: forge(typ=None), "token_malformed"),
        (lambda: forge(sub=None), "token_malformed"),
        (lambda: forge(exp=None), "token_malformed"),
        (lambda: forge(sub="not-a-uuid"), "token_malformed"),
        (lambda: forge(sid="not-a-uuid"), "token_malformed"),
        (lambda: forge(jti=12), "token_malformed"),
        (lambda: forge(sid=12), "token_malformed"),  # was an AttributeError out of verify()
        (lambda: forge(sid=["x"]), "token_malformed"),
        (lambda: forge(iat="yesterday"), "token_malformed"),
    ],
)
def test_refusals_have_stable_codes(make: Callable[[], str], code: str) -> None:
    # Tokens are made when the test runs, not at collection: a slow suite would
    # otherwise let the valid ones expire first.
    assert refused(make()) == code


def test_a_wrong_type_names_the_type_required() -> None:
    with pytest.raises(TokenError) as caught:
        CODEC.verify(issue(type="access"), expected="refresh")
    assert caught.value.code == "token_wrong_type"
    assert "refresh" in caught.value.message
    assert CODEC.verify(issue(type="refresh"), expected="refresh").type == "refresh"


def test_optional_claims_have_defaults() -> None:
    claims = CODEC.verify(forge(email=None, role=None), expected="access")
    assert (claims.email, claims.role) == ("", "user")


# -- the cache of verified tokens -------------------------------------------------------------


class CountingCodec:
    """A codec that counts the verifications that reached it."""

    def __init__(self, codec: TokenCodec = CODEC) -> None:
        self.codec = codec
        self.calls = 0

    def verify(self, token: str, *, expected: TokenType) -> Claims:
        self.calls += 1
        return self.codec.verify(token, expected=expected)

    def as_codec(self) -> TokenCodec:
        return cast(TokenCodec, self)


def test_a_verified_token_is_checked_once() -> None:
    counting = CountingCodec()
    cache = VerifiedTokens(counting.as_codec())
    token = issue()
    first = cache.verify(token, expected="access")
    assert cache.verify(token, expected="access") == first
    assert counting.calls == 1
    assert first == CODEC.verify(token, expected="access")


def test_the_cache_refuses_what_the_codec_refuses() -> None:
    counting = CountingCodec()
    cache = VerifiedTokens(counting.as_codec())
    access = issue()
    cache.verify(access, expected="access")
    # A cached access token is still not a refresh token.
    with pytest.raises(TokenError) as caught:
        cache.verify(access, expected="refresh")
    assert caught.value.code == "token_wrong_type"
    # A refused token is never remembered: each try is checked again.
    forged = forge(secret="another-secret-that-is-long-enough-as-well")
    for _ in range(2):
        with pytest.raises(TokenError) as caught:
            cache.verify(forged, expected="access")
        assert caught.value.code == "token_invalid_signature"
    assert counting.calls == 4


def test_a_cached_token_past_its_expiry_is_checked_again() -> None:
    class ExpiringCodec(CountingCodec):
        def verify(self, token: str, *, expected: TokenType) -> Claims:
            self.calls += 1
            if self.calls > 1:
                raise TokenError("token_expired", "The token has expired")
            now = int(time.time())
            return Claims(USER, "", "user", SESSION, uuid.uuid4(), expected, now - 60, now - 1)

    codec = ExpiringCodec()
    cache = VerifiedTokens(codec.as_codec())
    cache.verify("t", expected="access")  # the codec's answer, expired or not
    with pytest.raises(TokenError) as caught:
        cache.verify("t", expected="access")
    assert caught.value.code == "token_expired"


def test_the_cache_is_bounded() -> None:
    counting = CountingCodec()
    cache = VerifiedTokens(counting.as_codec(), max_entries=2)
    tokens = [issue() for _ in range(3)]
    for token in tokens[:2]:
        cache.verify(token, expected="access")
    cache.verify(tokens[0], expected="access")
    assert counting.calls == 2  # both held
    cache.verify(tokens[2], expected="access")  # full: starts afresh with this one
    cache.verify(tokens[2], expected="access")
    assert counting.calls == 3
    cache.verify(tokens[0], expected="access")
    assert counting.calls == 4
