"""Accounts and tokens through the real server: good paths and every bad one."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
from conftest import FakeClock, Running, StartServer

from atrium.persistence import accounts
from atrium.persistence.database import Database

SECRET = "test-secret-key-with-enough-length-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: object) -> str:
    return response.json()["error"]["code"]  # type: ignore[attr-defined, no-any-return]


async def test_duplicate_signup_is_409_case_insensitively(server: Running) -> None:
    c = server.client
    r = await c.post(
        "/api/v1/auth/signup", json={"email": "bob@example.com", "password": "password1"}
    )
    assert r.status_code == 201
    r = await c.post(
        "/api/v1/auth/signup", json={"email": "BOB@example.com", "password": "password2"}
    )
    assert r.status_code == 409
    assert error_code(r) == "email_taken"


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": "password1"},
        {"email": "a@example.com", "password": "short"},
        {"email": "a@example.com"},
        {"email": "a@example.com", "password": "password1", "admin": True},
        {"email": 42, "password": "password1"},
        [],
    ],
)
async def test_invalid_signup_is_422_and_writes_nothing(
    server: Running, db: Database, body: object
) -> None:
    r = await server.client.post("/api/v1/auth/signup", json=body)
    assert r.status_code == 422
    assert error_code(r) == "validation_error"
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_wrong_password_and_unknown_email_look_the_same(server: Running) -> None:
    await server.signup_login("carol@example.com")
    c = server.client
    wrong = await c.post(
        "/api/v1/auth/login", json={"email": "carol@example.com", "password": "nope-nope"}
    )
    unknown = await c.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": "nope-nope"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert error_code(wrong) == "invalid_credentials"


async def test_refresh_rotates_and_reuse_revokes_the_family(server: Running, db: Database) -> None:
    c = server.client
    first = await server.signup_login("dave@example.com")
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json()
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 200
    third = r.json()

    # The thief replays the first token: the whole family dies, descendants included.
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401
    assert error_code(r) == "refresh_token_reused"
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": third["refresh_token"]})
    assert r.status_code == 401
    assert error_code(r) == "session_revoked"
    r = await c.get("/api/v1/auth/me", headers=bearer(third["access_token"]))
    assert r.status_code == 401
    sid = uuid.UUID(jwt.decode(third["access_token"], options={"verify_signature": False})["sid"])
    reason = await db.fetchval("SELECT revoked_reason FROM sessions WHERE id = $1", sid)
    assert reason == "refresh_token_reuse"

    # Another login (another family) is unaffected.
    r = await c.post(
        "/api/v1/auth/login", json={"email": "dave@example.com", "password": "correct horse"}
    )
    assert (
        await c.get("/api/v1/auth/me", headers=bearer(r.json()["access_token"]))
    ).status_code == 200


async def test_logout_ends_access_and_refresh_tokens(server: Running) -> None:
    c = server.client
    tokens = await server.signup_login("erin@example.com")
    r = await c.post("/api/v1/auth/logout", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200
    r = await c.get("/api/v1/auth/me", headers=bearer(tokens["access_token"]))
    assert error_code(r) == "session_revoked"
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401
    r = await c.post("/api/v1/auth/logout", headers=bearer(tokens["access_token"]))
    assert r.status_code == 401


def forge(**changes: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(uuid.uuid4()),
        "email": "x@example.com",
        "role": "user",
        "iat": now,
        "exp": now + 600,
        "aud": "workspace-api",
        "iss": "workspace-backend",
        "jti": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "typ": "access",
    }
    secret = str(changes.pop("secret", SECRET))
    claims.update(changes)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "token_missing"),
        ("Basic dXNlcjpwYXNz", "token_missing"),
        ("Bearer", "token_missing"),
        ("Bearer not.a.jwt", "token_malformed"),
        (f"Bearer {forge(exp=int(time.time()) - 10)}", "token_expired"),
        (
            f"Bearer {forge(secret='another-secret-another-secret-another-secret')}",
            "token_invalid_signature",
        ),
        (f"Bearer {forge(aud='someone-else')}", "token_invalid_audience"),
        (f"Bearer {forge(iss='evil-issuer')}", "token_invalid_issuer"),
        (f"Bearer {forge(typ='refresh')}", "token_wrong_type"),
        (f"Bearer {forge(jti=None)}", "token_malformed"),
        (f"Bearer {forge(sub='not-a-uuid')}", "token_malformed"),
        (f"Bearer {forge()}", "session_revoked"),  # well-formed but no such session
    ],
)
async def test_bad_access_tokens_are_401_with_stable_codes(
    server: Running, header: str | None, code: str
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = await server.client.get("/api/v1/auth/me", headers=headers)
    assert r.status_code == 401
    assert error_code(r) == code
    assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_tampered_token_is_refused(server: Running) -> None:
    tokens = await server.signup_login("frank@example.com")
    header, payload, signature = tokens["access_token"].split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    r = await server.client.get("/api/v1/auth/me", headers=bearer(f"{header}.{payload}.{flipped}"))
    assert r.status_code == 401
    assert error_code(r) == "token_invalid_signature"


async def test_access_token_is_refused_as_refresh_token(server: Running) -> None:
    tokens = await server.signup_login("gina@example.com")
    r = await server.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["access_token"]}
    )
    assert r.status_code == 401
    assert error_code(r) == "token_wrong_type"
    r = await server.client.get("/api/v1/auth/me", headers=bearer(tokens["refresh_token"]))
    assert error_code(r) == "token_wrong_type"


async def test_login_rate_limit_reached_and_reset(start_server: StartServer) -> None:
    clock = FakeClock()
    async with start_server(clock=clock, AUTH_RATE_LIMIT_PER_MINUTE=3) as srv:
        c = srv.client
        await c.post(
            "/api/v1/auth/signup", json={"email": "hal@example.com", "password": "password1"}
        )
        body = {"email": "hal@example.com", "password": "wrong-password"}
        for remaining in (2, 1, 0):
            r = await c.post("/api/v1/auth/login", json=body)
            assert r.status_code == 401
            assert r.headers["X-RateLimit-Limit"] == "3"
            assert r.headers["X-RateLimit-Remaining"] == str(remaining)
        r = await c.post("/api/v1/auth/login", json={**body, "password": "password1"})
        assert r.status_code == 429
        assert error_code(r) == "rate_limited"
        assert r.headers["Retry-After"] == "60"
        assert int(r.headers["X-RateLimit-Reset"]) == int(clock.now) + 60

        clock.advance(30)
        r = await c.post("/api/v1/auth/login", json=body)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "30"

        clock.advance(30)
        r = await c.post("/api/v1/auth/login", json={**body, "password": "password1"})
        assert r.status_code == 200


async def test_login_limit_is_per_email_too(start_server: StartServer) -> None:
    # The (address, email) pair budget holds for any letter case of the email, while the
    # address budget still has room (tests/test_login_limits.py: other addresses).
    clock = FakeClock()
    async with start_server(clock=clock, AUTH_RATE_LIMIT_PER_MINUTE=2) as srv:
        c = srv.client
        for _ in range(2):
            await c.post(
                "/api/v1/auth/login", json={"email": "ivy@example.com", "password": "xxxxxxxx"}
            )
        r = await c.post(
            "/api/v1/auth/login", json={"email": "IVY@example.com", "password": "xxxxxxxx"}
        )
        assert r.status_code == 429


async def test_api_rate_limit_per_user(start_server: StartServer) -> None:
    clock = FakeClock()
    async with start_server(clock=clock, RATE_LIMIT_PER_MINUTE=2) as srv:
        a = await srv.signup_login("jay@example.com")
        b = await srv.signup_login("kim@example.com")
        c = srv.client
        assert (
            await c.get("/api/v1/auth/me", headers=bearer(a["access_token"]))
        ).status_code == 200
        assert (
            await c.get("/api/v1/auth/me", headers=bearer(a["access_token"]))
        ).status_code == 200
        r = await c.get("/api/v1/auth/me", headers=bearer(a["access_token"]))
        assert r.status_code == 429
        assert r.headers["X-RateLimit-Remaining"] == "0"
        assert r.headers["Retry-After"] == "60"
        assert (
            await c.get("/api/v1/auth/me", headers=bearer(b["access_token"]))
        ).status_code == 200
        clock.advance(60)
        assert (
            await c.get("/api/v1/auth/me", headers=bearer(a["access_token"]))
        ).status_code == 200


async def test_tokens_survive_a_restart_with_the_dev_key(start_server: StartServer) -> None:
    # Development keeps its generated key in the data directory.
    async with start_server(ENVIRONMENT="development", SECRET_KEY="") as first:
        tokens = await first.signup_login("lee@example.com")
    async with start_server(ENVIRONMENT="development", SECRET_KEY="") as second:
        r = await second.client.get("/api/v1/auth/me", headers=bearer(tokens["access_token"]))
        assert r.status_code == 200


async def test_session_cache_sees_a_revocation_elsewhere_within_its_ttl(
    start_server: StartServer, db: Database
) -> None:
    # Another instance (here: the database directly) revokes the session; this instance
    # trusts its cached session for at most SESSION_CACHE_SECONDS.
    clock = FakeClock()
    async with start_server(clock=clock, SESSION_CACHE_SECONDS=5) as srv:
        tokens = await srv.signup_login("mia@example.com")
        headers = bearer(tokens["access_token"])
        assert (await srv.client.get("/api/v1/auth/me", headers=headers)).status_code == 200
        sid = uuid.UUID(
            jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
        )
        await accounts.revoke_session(db, sid, "elsewhere")
        assert (await srv.client.get("/api/v1/auth/me", headers=headers)).status_code == 200
        clock.advance(5)
        r = await srv.client.get("/api/v1/auth/me", headers=headers)
        assert r.status_code == 401 and error_code(r) == "session_revoked"
