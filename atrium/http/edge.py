"""A plain ASGI layer in front of the QuartTrio app: CORS, security headers, liveness.

Everything here is decided from the request line and headers, with pre-encoded header
bytes, so requests pay nothing for it beyond a scan of their headers:

- **CORS** from ALLOWED_ORIGINS. A request without ``Origin`` (servers, CLIs, probes)
  skips it entirely. Preflights are answered here (204, or 403 in the error shape); actual
  requests from an allowed origin get ``Access-Control-Allow-Origin`` and the exposed
  rate-limit headers. (quart-cors, used before, cost about a tenth of an authenticated
  request on every request and answered refused preflights outside the error shape.)
- **Security headers** on every HTTP response (and ``Cache-Control: no-store`` on auth).
- **Liveness**: ``GET /health`` from a probe (no ``Origin``) is answered without the app.
- **WebSockets** go to their own ASGI application (``ws.WorkspaceSockets``), past Quart.
- **Containment**: an exception that escapes the app (Quart renders its own as 500s) ends
  that request alone with a 500 in the error shape, logged once and counted; a 413 closes
  the connection (``Connection: close``), as the body it refused was never read.
"""

from __future__ import annotations

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from ..core.failures import ContainedFailures
from .json import error_body

ALLOWED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Requested-With")
EXPOSED_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")
# Headers a browser may send without asking (the CORS safelist).
_SAFELISTED = frozenset({"accept", "accept-language", "content-language", "content-type"})
# The pages a browser renders (pages.py) and their assets, all served by the app itself.
_PAGES = frozenset({"/docs", "/docs/", "/demo", "/demo/", "/console", "/console/"})
_STATIC_PATH = "/static/"
# Scripts, styles, images and connections (REST, and WebSockets: CSP 3 'self' covers ws:
# and wss: on the same host) from the app only. Swagger UI's icons are data: SVGs; it sets
# no inline styles that CSP governs (style attributes in markup, <style> elements).
_PAGE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_AUTH_PATH = "/api/v1/auth"
# Operator data (the console's JSON, the supervision tree): never kept by a cache either.
_OPERATOR_PATHS = ("/ops/", "/health/supervisor")
_HEALTH_BODY = b'{"status":"ok"}'
_INTERNAL_ERROR_BODY = error_body("internal_error", "Something went wrong on our side")

Headers = list[tuple[bytes, bytes]]


class Edge:
    """CORS, security headers and the liveness probe, in front of ``app``."""

    def __init__(
        self,
        app: ASGIFramework,
        *,
        production: bool,
        allowed_origins: tuple[str, ...],
        websocket: ASGIFramework | None = None,
        failures: ContainedFailures | None = None,
    ) -> None:
        self.app = app
        self.websocket = websocket or app
        self.failures = failures or ContainedFailures()
        self._any_origin = "*" in allowed_origins
        self._origins = frozenset(allowed_origins)
        self._methods = frozenset(ALLOWED_METHODS)
        self._request_headers = frozenset(h.lower() for h in ALLOWED_HEADERS) | _SAFELISTED
        common: Headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            # Every response depends on Origin (CORS headers come and go with it), also
            # one sent without it: a shared cache must not serve it to a browser's request.
            (b"vary", b"Origin"),
        ]
        if production:
            common.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
        self._page_headers = [*common, (b"content-security-policy", _PAGE_CSP)]
        self._headers = [
            *common,
            (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
        ]
        # Tokens, credentials and operator data must never be cached by a browser or a proxy.
        self._auth_headers = [*self._headers, (b"cache-control", b"no-store")]
        self._health_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_HEALTH_BODY)).encode()),
            *self._headers,
        ]
        self._preflight_headers = [
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
            (b"access-control-max-age", b"86400"),
        ]
        self._cors_headers = [
            (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()),
        ]

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = preflight_method = preflight_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight_method = value
            elif name == b"access-control-request-headers":
                preflight_headers = value
        path, method = scope["path"], scope["method"]
        if path.startswith(_AUTH_PATH) or path.startswith(_OPERATOR_PATHS):
            extra = self._auth_headers
        elif path in _PAGES or path.startswith(_STATIC_PATH):
            extra = self._page_headers
        else:
            extra = self._headers
        if origin is None:
            if path == "/health" and method in ("GET", "HEAD"):
                await send_response(
                    send, 200, self._health_headers, _HEALTH_BODY if method == "GET" else b""
                )
                return
        elif method == "OPTIONS" and preflight_method is not None:
            await self._preflight(send, origin, preflight_method, preflight_headers)
            return
        elif self._allows(origin):
            extra = [*extra, (b"access-control-allow-origin", origin), *self._cors_headers]

        started = False

        async def send_with_headers(message: ASGISendEvent) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message["headers"], *extra]
                if message["status"] == 413:
                    # The refused body is still on the socket: a kept-alive connection
                    # would read it as the next request and hang.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as error:
            context = {"method": method, "path": path[:200]}
            self.failures.record("request", error, context)
            if not started:  # else hypercorn ends the half-sent response
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_INTERNAL_ERROR_BODY)).encode()),
                    *extra,
                ]
                await send_response(send, 500, headers, _INTERNAL_ERROR_BODY)

    def _allows(self, origin: bytes) -> bool:
        return self._any_origin or origin.decode("latin-1").rstrip("/") in self._origins

    async def _preflight(
        self, send: ASGISendCallable, origin: bytes, method: bytes, headers: bytes | None
    ) -> None:
        requested = {h.strip().lower() for h in (headers or b"").decode("latin-1").split(",")}
        requested.discard("")
        if (
            self._allows(origin)
            and method.decode("latin-1").upper() in self._methods
            and requested <= self._request_headers
        ):
            allow = [(b"access-control-allow-origin", origin), *self._preflight_headers]
            await send_response(send, 204, [*allow, *self._headers], b"")
            return
        body = error_body(
            "cors_not_allowed", "This origin, method or header is not allowed (ALLOWED_ORIGINS)"
        )
        headers_out = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *self._headers,
        ]
        await send_response(send, 403, headers_out, body)


async def send_response(send: ASGISendCallable, status: int, headers: Headers, body: bytes) -> None:
    """Send a whole HTTP response: its start, then ``body`` in one message."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
