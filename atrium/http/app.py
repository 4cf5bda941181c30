"""The QuartTrio application: blueprints, JSON, errors, limits; wrapped by the Edge layer."""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, g, request
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest

from ..core import json_input
from ..core.logs import bind
from ..domain.services import Services
from . import auth, console, document_content, documents, jobs, ops, pages, projects, ws
from .edge import Edge
from .errors import ApiError, register_error_handlers
from .hot import HotRoutes
from .json import OrjsonProvider
from .request_log import RequestLog
from .request_metrics import RequestMetrics, set_route
from .schemas import ContractProvider


class AtriumRequest(TrioRequest):
    """A request whose malformed JSON body (not UTF-8, not JSON, or nested deeper than
    ``json_input.MAX_DEPTH``) is a 400 malformed_json, never a bare 400 or a 500."""

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        try:
            return await super().get_json(force, silent, cache)
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_json", "The request body is not UTF-8 JSON") from None

    def on_json_loading_failed(self, error: Exception) -> Any:
        if isinstance(error, json_input.TooDeep):
            raise ApiError(400, "malformed_json", f"The request body is not valid: {error}")
        raise ApiError(400, "malformed_json", "The request body is not valid JSON")


def create_app(svc: Services) -> QuartTrio:
    """Build the HTTP application around ``svc`` (no I/O happens here)."""
    settings = svc.settings
    app = QuartTrio("atrium")
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
        swagger_ui_path=None,  # pages.py serves /docs from the package (offline, strict CSP)
        openapi_provider_class=ContractProvider,
    )
    # After QuartSchema, which installs its own provider (stdlib json, unbounded depth).
    app.json = OrjsonProvider(app)
    app.register_blueprint(ops.blueprint)
    app.register_blueprint(auth.blueprint)
    app.register_blueprint(projects.blueprint)
    app.register_blueprint(document_content.blueprint)
    app.register_blueprint(jobs.blueprint)
    app.register_blueprint(ws.blueprint)
    app.register_blueprint(documents.blueprint)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(console.blueprint)
    register_error_handlers(app)

    @app.before_request
    async def note_route() -> None:
        # The route template names the request in the access line and in the metrics
        # (RequestMetrics), not the ids in the path; no rule: unmatched.
        rule = request.url_rule
        if rule is not None:
            bind(route=rule.rule)
            set_route(request.scope, rule.rule)

    if settings.environment == "development":

        @app.get("/metrics")
        async def metrics() -> Response:
            """This process's Prometheus metrics (development only; METRICS_PORT serves
            them everywhere)."""
            body = await svc.metrics.exposition()
            return Response(body, 200, content_type=CONTENT_TYPE_LATEST)

    @app.after_request
    async def add_rate_headers(response: Response) -> Response:
        # CORS, security and cache headers are added by the Edge layer (edge.py).
        decision = g.get("rate_decision")
        if decision is not None:
            response.headers.update(decision.headers())
        return response

    return app


class ShieldedEnd:
    """Shields the last send of each of ``app``'s HTTP responses from cancellation.

    hypercorn recycles or closes the connection inside that send, and Quart cancels the
    request's tasks as the response ends: a close cut short there left the socket open
    until a timeout (issue 9: 32 s after a 413). Only Quart's responses need it (a shielded
    scope costs about 3.5 µs a response), so it wraps Quart alone.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        await self.app(scope, receive, send_shielded)


def create_asgi(svc: Services) -> RequestLog:
    """The ASGI application to serve: request ids and access lines (``RequestLog``)
    around the Edge layer around the metrics, the hot routes (``hot.py``) and
    ``create_app(svc)``."""
    settings = svc.settings
    edge = Edge(
        RequestMetrics(HotRoutes(ShieldedEnd(create_app(svc)), svc), svc.metrics),
        production=settings.is_production,
        allowed_origins=settings.allowed_origins,
        websocket=ws.WorkspaceSockets(svc.realtime, svc.document_sessions),
        failures=svc.failures,
    )
    return RequestLog(edge)
