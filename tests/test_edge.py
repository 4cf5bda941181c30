"""The edge layer as a plain ASGI app: CORS, security headers, the liveness fast path,
WebSocket routing and the contained 500, in front of a tiny fake app (no server)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import pytest
import trio

from atrium.http.app import ShieldedEnd
from atrium.http.edge import Edge

ORIGIN = "https://app.example.com"

Message = dict[str, Any]
App = Callable[[Any, Any, Any], Awaitable[None]]  # an ASGI app, loosely


class FakeApp:
    """An inner ASGI app that records its calls and answers ``status`` with a JSON body."""

    def __init__(self, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None):
        self.status = status
        self.headers = headers or [(b"content-type", b"application/json")]
        self.scopes: list[Message] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": b'{"ok":true}', "more_body": False})


class Response:
    def __init__(self, sent: list[Message]) -> None:
        start, *bodies = sent
        assert start["type"] == "http.response.start"
        self.status: int = start["status"]
        self.header_list: list[tuple[bytes, bytes]] = list(start["headers"])
        self.body = b"".join(message.get("body", b"") for message in bodies)
        assert bodies and not bodies[-1].get("more_body", False)

    def header(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def values(self, name: str) -> list[str]:
        wanted = name.lower().encode()
        return [value.decode() for key, value in self.header_list if key == wanted]

    def json(self) -> Any:
        return orjson.loads(self.body)


def make_edge(
    app: Any = None,
    *,
    production: bool = False,
    origins: tuple[str, ...] = (ORIGIN,),
    websocket: Any = None,
) -> Edge:
    return Edge(
        cast(Any, app or FakeApp()),
        production=production,
        allowed_origins=origins,
        websocket=websocket,
    )


async def request(
    edge: Edge, method: str = "GET", path: str = "/api/v1/projects/", **headers: str
) -> Response:
    scope: Message = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [
            (name.replace("_", "-").lower().encode(), value.encode())
            for name, value in headers.items()
        ],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        await trio.lowlevel.checkpoint()  # as a real server's send would
        sent.append(message)

    await edge(cast(Any, scope), cast(Any, receive), cast(Any, send))
    return Response(sent)


def preflight(edge: Edge, origin: str = ORIGIN, method: str = "POST", **headers: str) -> Any:
    return request(
        edge,
        "OPTIONS",
        origin=origin,
        access_control_request_method=method,
        **headers,
    )


SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
CSP = "default-src 'none'; frame-ancestors 'none'"


PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def assert_secure(response: Response, *, csp: str = CSP) -> None:
    for name, value in SECURITY.items():
        assert response.header(name) == value, name
    assert response.header("content-security-policy") == csp


# -- liveness -------------------------------------------------------------------------------


async def test_health_from_a_probe_is_answered_without_the_app() -> None:
    app = FakeApp()
    edge = make_edge(app)
    response = await request(edge, "GET", "/health")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert response.header("content-type") == "application/json"
    assert response.header("content-length") == str(len(response.body))
    assert_secure(response)
    head = await request(edge, "HEAD", "/health")
    assert (head.status, head.body) == (200, b"")
    assert head.header("content-length") == response.header("content-length")
    assert app.scopes == []


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/health", {}),
        ("GET", "/health/supervisor", {}),
        ("GET", "/health", {"origin": ORIGIN}),  # from a page: the app answers, with CORS
    ],
)
async def test_anything_else_goes_to_the_app(
    method: str, path: str, headers: dict[str, str]
) -> None:
    app = FakeApp()
    response = await request(make_edge(app), method, path, **headers)
    assert response.json() == {"ok": True}
    assert [scope["path"] for scope in app.scopes] == [path]


# -- CORS -----------------------------------------------------------------------------------


async def test_an_allowed_preflight_is_answered_204() -> None:
    app = FakeApp()
    edge = make_edge(app)
    response = await preflight(
        edge, method="patch", access_control_request_headers="Authorization, content-type, Accept"
    )
    assert response.status == 204 and response.body == b""
    assert response.header("access-control-allow-origin") == ORIGIN
    assert response.header("access-control-allow-methods") == (
        "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    )
    assert response.header("access-control-allow-headers") == (
        "Authorization, Content-Type, X-Requested-With"
    )
    assert response.header("access-control-max-age") == "86400"
    assert response.header("vary") == "Origin"
    assert_secure(response)
    assert app.scopes == []
    # A trailing slash on the origin is the same origin; no requested headers is fine.
    assert (await preflight(edge, origin=ORIGIN + "/")).status == 204


@pytest.mark.parametrize(
    ("origin", "method", "headers"),
    [
        ("https://evil.example", "POST", ""),
        ("https://app.example.com.evil.example", "GET", ""),
        ("null", "GET", ""),
        (ORIGIN, "TRACE", ""),
        (ORIGIN, "CONNECT", ""),
        (ORIGIN, "POST", "authorization, x-api-key"),
        (ORIGIN, "POST", "cookie"),
    ],
)
async def test_a_refused_preflight_is_403_in_the_error_shape(
    origin: str, method: str, headers: str
) -> None:
    app = FakeApp()
    extra = {"access_control_request_headers": headers} if headers else {}
    response = await preflight(make_edge(app), origin=origin, method=method, **extra)
    assert response.status == 403
    assert response.json()["error"]["code"] == "cors_not_allowed"
    assert response.header("content-length") == str(len(response.body))
    assert response.header("access-control-allow-origin") is None
    assert response.header("vary") == "Origin"
    assert_secure(response)
    assert app.scopes == []


async def test_any_origin_when_the_allowlist_says_so() -> None:
    edge = make_edge(origins=("*",))
    response = await preflight(edge, origin="https://anyone.example")
    assert response.status == 204
    # The origin itself is echoed, never "*" (credentials would be refused with "*").
    assert response.header("access-control-allow-origin") == "https://anyone.example"
    actual = await request(edge, origin="https://anyone.example")
    assert actual.header("access-control-allow-origin") == "https://anyone.example"


async def test_an_options_request_that_is_no_preflight_goes_to_the_app() -> None:
    app = FakeApp()
    response = await request(make_edge(app), "OPTIONS", origin=ORIGIN)
    assert response.json() == {"ok": True}
    assert len(app.scopes) == 1


async def test_an_allowed_origin_may_read_the_response_and_its_rate_headers() -> None:
    app = FakeApp(headers=[(b"content-type", b"application/json"), (b"x-request-id", b"r1")])
    response = await request(make_edge(app), "POST", origin=ORIGIN + "/", user_agent="browser")
    assert response.json() == {"ok": True}
    assert response.header("access-control-allow-origin") == ORIGIN + "/"
    assert response.header("access-control-expose-headers") == (
        "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"
    )
    assert response.header("vary") == "Origin"
    assert response.header("x-request-id") == "r1"  # the app's own headers are kept
    assert_secure(response)


async def test_an_unknown_origin_gets_the_response_but_no_cors_grant() -> None:
    # The browser, not the server, withholds it from the page: the app still answers.
    app = FakeApp()
    response = await request(make_edge(app), origin="https://evil.example")
    assert response.json() == {"ok": True}
    assert response.header("access-control-allow-origin") is None
    assert response.header("access-control-expose-headers") is None
    assert response.header("vary") == "Origin"
    assert len(app.scopes) == 1


async def test_a_request_without_origin_has_no_cors_headers_but_varies_on_origin() -> None:
    # A shared cache must not hand this response (no CORS grant) to a browser's request.
    response = await request(make_edge())
    assert response.header("access-control-allow-origin") is None
    assert response.header("vary") == "Origin"
    assert_secure(response)


# -- security headers -------------------------------------------------------------------------


async def test_security_headers_by_path_and_environment() -> None:
    edge = make_edge()
    api = await request(edge)
    assert_secure(api)
    assert api.header("strict-transport-security") is None  # not on plain-HTTP development
    assert api.header("cache-control") is None

    for path in ("/api/v1/auth/login", "/api/v1/auth/refresh"):
        auth = await request(edge, "POST", path)
        assert_secure(auth)
        assert auth.header("cache-control") == "no-store"  # tokens are never cached

    for path in ("/docs", "/demo", "/static/atrium.js", "/static/swagger-ui/swagger-ui.css"):
        page = await request(edge, "GET", path)
        assert_secure(page, csp=PAGE_CSP)  # pages run scripts and styles, from 'self' only
    for path in ("/openapi.json", "/demonstration", "/staticky"):
        assert_secure(await request(edge, "GET", path))

    production = make_edge(production=True)
    for path in ("/api/v1/projects/", "/docs", "/api/v1/auth/login", "/health"):
        response = await request(production, "GET", path)
        assert response.header("strict-transport-security") == (
            "max-age=63072000; includeSubDomains"
        )


async def test_a_413_closes_the_connection() -> None:
    response = await request(make_edge(FakeApp(413)), "POST")
    assert response.status == 413
    assert response.header("connection") == "close"
    assert (await request(make_edge(FakeApp(400)), "POST")).header("connection") is None


# -- routing and containment ------------------------------------------------------------------


async def test_websockets_go_to_their_own_app_and_lifespan_to_the_app() -> None:
    http_app, ws_app = FakeApp(), FakeApp()
    edge = make_edge(http_app, websocket=ws_app)
    nothing: Any = None
    await edge(cast(Any, {"type": "websocket", "path": "/ws/p"}), nothing, nothing)
    assert [scope["type"] for scope in ws_app.scopes] == ["websocket"]
    lifespan: list[Message] = []

    async def lifespan_app(scope: Message, receive: Any, send: Any) -> None:
        lifespan.append(scope)

    edge = make_edge(lifespan_app, websocket=ws_app)
    await edge(cast(Any, {"type": "lifespan"}), nothing, nothing)
    assert lifespan == [{"type": "lifespan"}]
    assert len(ws_app.scopes) == 1
    assert http_app.scopes == []
    # Without a WebSocket app of its own, the app serves WebSockets too.
    edge = make_edge(http_app)
    await edge(cast(Any, {"type": "websocket", "path": "/ws/p"}), nothing, nothing)
    assert [scope["type"] for scope in http_app.scopes] == ["websocket"]


async def test_an_exception_before_the_response_is_a_500_with_the_usual_headers() -> None:
    async def crashing(scope: Message, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    edge = make_edge(crashing)
    response = await request(edge, "POST", "/api/v1/auth/login", origin=ORIGIN)
    assert response.status == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "Something went wrong on our side"}
    }
    assert response.header("content-length") == str(len(response.body))
    # The page can read the error, and the auth path's headers still apply.
    assert response.header("access-control-allow-origin") == ORIGIN
    assert response.header("cache-control") == "no-store"
    assert_secure(response)
    assert edge.failures.counts() == {"connection": 0, "request": 1}


async def test_an_exception_after_the_response_started_is_counted_not_answered_twice() -> None:
    async def half(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[1,", "more_body": True})
        raise RuntimeError("a bug mid-body")

    edge = make_edge(half)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    await edge(cast(Any, scope), cast(Any, None), cast(Any, send))
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert edge.failures.counts()["request"] == 1


async def test_the_last_body_is_sent_even_as_the_request_is_cancelled() -> None:
    # Quart cancels a request's tasks as it ends; the final send must still complete,
    # or the connection is left open until a timeout (issue 9).
    async def cancelled_as_it_ends(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        with trio.CancelScope() as ending:
            ending.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    shielded = ShieldedEnd(cast(Any, cancelled_as_it_ends))  # around Quart (app.py)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message)

    scope = {"type": "http", "method": "DELETE", "path": "/x", "headers": []}
    await shielded(cast(Any, scope), cast(Any, None), cast(Any, send))
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
