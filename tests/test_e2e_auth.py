from __future__ import annotations

from conftest import Running


async def test_signup_login_me_refresh_logout_over_real_http(server: Running) -> None:
    c = server.client
    r = await c.post(
        "/api/v1/auth/signup", json={"email": "Ada@Example.com", "password": "s3cret-pass"}
    )
    assert r.status_code == 201
    assert r.json()["message"] == "Signup successful"
    user_id = r.json()["user_id"]

    r = await c.post(
        "/api/v1/auth/login", json={"email": "ada@example.com", "password": "s3cret-pass"}
    )
    assert r.status_code == 200
    tokens = r.json()
    assert tokens["user_id"] == user_id
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 30 * 60

    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    r = await c.get("/api/v1/auth/me", headers=auth)
    assert r.status_code == 200
    assert r.json()["user_id"] == user_id
    assert r.json()["email"] == "Ada@example.com"  # domain normalised

    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200
    rotated = r.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    auth = {"Authorization": f"Bearer {rotated['access_token']}"}
    assert (await c.get("/api/v1/auth/me", headers=auth)).status_code == 200

    r = await c.post("/api/v1/auth/logout", headers=auth)
    assert r.status_code == 200
    r = await c.get("/api/v1/auth/me", headers=auth)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "session_revoked"
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert r.status_code == 401
