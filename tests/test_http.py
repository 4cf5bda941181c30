"""HTTP hygiene: the one error shape, limits, CORS, headers, health and docs."""

from __future__ import annotations

from conftest import Running, StartServer


async def test_unknown_route_and_wrong_method_use_the_error_shape(server: Running) -> None:
    r = await server.client.get("/no/such/thing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = await server.client.delete("/api/v1/auth/login")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


async def test_malformed_json_is_400(server: Running) -> None:
    token = (await server.signup_login("json@example.com"))["access_token"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    # Found by schemathesis: a body that is not UTF-8 was a 500 inside quart-trio.
    for body in (b"{not json", b"\x95\xff{", b'{"email": "\xfc@example.com"}'):
        for path in ("/api/v1/auth/login", "/api/v1/auth/signup", "/api/v1/projects/"):
            r = await server.client.post(path, content=body, headers=headers)
            assert r.status_code == 400, (path, body, r.text)
            assert r.json()["error"]["code"] == "malformed_json"


async def test_non_json_body_is_422(server: Running) -> None:
    r = await server.client.post(
        "/api/v1/auth/login",
        content=b"email=a&password=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"


async def test_oversize_body_is_413(start_server: StartServer) -> None:
    async with start_server(MAX_BODY_BYTES=2048) as srv:
        big = b'{"email": "' + b"a" * 4096 + b'@example.com", "password": "password1"}'
        r = await srv.client.post(
            "/api/v1/auth/signup", content=big, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"


async def test_cors_allows_listed_origins_only(start_server: StartServer) -> None:
    async with start_server(ALLOWED_ORIGINS='["https://app.example.com"]') as srv:
        preflight = {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        }
        r = await srv.client.options("/api/v1/auth/login", headers=preflight)
        assert r.status_code == 204
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert r.headers["Access-Control-Max-Age"] == "86400"
        for refused in (
            {**preflight, "Origin": "https://evil.example.com"},
            {**preflight, "Access-Control-Request-Method": "TRACE"},
            {**preflight, "Access-Control-Request-Headers": "X-Secret"},
        ):
            r = await srv.client.options("/api/v1/auth/login", headers=refused)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "cors_not_allowed"
            assert "Access-Control-Allow-Origin" not in r.headers
        r = await srv.client.get("/health", headers={"Origin": "https://app.example.com"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "X-RateLimit-Remaining" in r.headers["Access-Control-Expose-Headers"]
        assert r.headers["Vary"] == "Origin"
        r = await srv.client.get("/health", headers={"Origin": "https://evil.example.com"})
        assert "Access-Control-Allow-Origin" not in r.headers
        r = await srv.client.get("/health")
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_any_origin_when_configured(start_server: StartServer) -> None:
    async with start_server(ALLOWED_ORIGINS="*") as srv:
        r = await srv.client.get("/ready", headers={"Origin": "https://anywhere.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://anywhere.example"


async def test_security_headers(server: Running) -> None:
    for path in ("/health", "/ready", "/api/v1/auth/me", "/nowhere"):
        r = await server.client.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert "default-src 'none'" in r.headers["Content-Security-Policy"], path
    assert (await server.client.get("/api/v1/auth/me")).headers["Cache-Control"] == "no-store"
    assert "Cache-Control" not in (await server.client.get("/ready")).headers
    for path in ("/docs", "/demo", "/static/atrium.js"):
        r = await server.client.get(path)
        assert r.status_code == 200, path
        # Pages run scripts and styles from the server itself, and from nowhere else.
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp and "connect-src 'self';" in csp, path
        assert "unsafe" not in csp and "http" not in csp, path
        assert r.headers["X-Frame-Options"] == "DENY"


async def test_health_and_ready(server: Running) -> None:
    r = await server.client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await server.client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {
        "ready": True,
        "status": "ready",
        "checks": {"database": {"ok": True}, "supervision": {"ok": True, "down": []}},
    }


async def test_openapi_documents_every_endpoint_with_schemas(server: Running) -> None:
    spec = (await server.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path, method in [
        ("/api/v1/auth/signup", "post"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/me", "get"),
        ("/health", "get"),
        ("/ready", "get"),
    ]:
        operation = paths[path][method]
        assert operation["responses"], (path, method)
        if method in ("post", "patch") and path != "/api/v1/auth/logout":
            assert "requestBody" in operation, path
    docs = await server.client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
