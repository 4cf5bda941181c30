"""The QuartTrio application: blueprints, JSON, errors, CORS, limits and headers."""

from __future__ import annotations

from typing import Any

from quart import Response, g, request
from quart_cors import cors
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest

from ..services import Services
from . import auth, ops, projects, ws
from .errors import ApiError, register_error_handlers
from .json import OrjsonProvider

_DOC_PATHS = ("/docs", "/redocs", "/scalar")
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


class AtriumRequest(TrioRequest):
    """A request whose malformed JSON body is a 400 malformed_json, not a bare 400."""

    def on_json_loading_failed(self, error: Exception) -> Any:
        raise ApiError(400, "malformed_json", "The request body is not valid JSON")


def create_app(svc: Services) -> QuartTrio:
    """Build the HTTP application around ``svc`` (no I/O happens here)."""
    settings = svc.settings
    app = QuartTrio("atrium")
    app.json = OrjsonProvider(app)
    app.request_class = AtriumRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"
    app.extensions["atrium"] = svc
    # Trailing-slash URLs are the seed's contract; do not redirect between the two forms.
    app.url_map.strict_slashes = False

    QuartSchema(
        app,
        info={
            "title": "atrium",
            "version": "0.1.0",
            "description": "Real-time collaborative workspace backend",
        },
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        redoc_ui_path=None,
        scalar_ui_path=None,
    )
    origins = list(settings.allowed_origins)
    cors(
        app,
        allow_origin="*" if "*" in origins else origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Requested-With"],
        expose_headers=[
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "Retry-After",
        ],
        max_age=86400,
    )
    app.register_blueprint(ops.blueprint)
    app.register_blueprint(auth.blueprint)
    app.register_blueprint(projects.blueprint)
    app.register_blueprint(ws.blueprint)
    register_error_handlers(app)

    production = settings.is_production

    @app.after_request
    async def add_headers(response: Response) -> Response:
        decision = g.get("rate_decision")
        if decision is not None:
            response.headers.update(decision.headers())
        headers = response.headers
        for name, value in _SECURITY_HEADERS.items():
            if name == "Content-Security-Policy" and request.path.startswith(_DOC_PATHS):
                continue  # the docs page loads Swagger UI's scripts and styles
            headers.setdefault(name, value)
        if production:
            headers.setdefault("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
        if request.path.startswith("/api/v1/auth"):
            headers["Cache-Control"] = "no-store"
        return response

    return app
