"""One error shape for every 4xx/5xx: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging

from quart import Quart, Response, g, request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from ..core.failures import ContainedFailures
from ..core.outages import DatabaseUnavailable
from .json import error_body

log = logging.getLogger("atrium.http")

# Seconds a client is told to wait while the database is away: an embedded PostgreSQL is
# back within a few seconds of a crash, and clients retrying sooner only add load.
DATABASE_RETRY_AFTER = 3

# Stable codes for errors raised by routing and by werkzeug itself.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    """An error the client caused or must know about; rendered as JSON with ``code``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str) -> Response:
    return Response(error_body(code, message), status=status, content_type="application/json")


def database_unavailable_error() -> ApiError:
    """The 503 for a request that needs the database while it is away."""
    return ApiError(
        503,
        "database_unavailable",
        "The database is unavailable; retry shortly",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
    )


def _validation_message(error: RequestSchemaValidationError) -> str:
    inner = error.validation_error
    details = getattr(inner, "errors", None)
    if callable(details):
        problems = details()
        if problems:
            first = problems[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            return f"{where}: {first.get('msg', 'is invalid')}"
    if isinstance(inner, TypeError):
        return "body: a JSON object is required"
    return "The request body is invalid"


def register_error_handlers(app: Quart) -> None:
    """Render every error as the one JSON shape; never leak a traceback."""

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        response = error_response(error.status, error.code, error.message)
        response.headers.update(error.headers)
        return response

    @app.errorhandler(RequestSchemaValidationError)
    async def validation_error(error: RequestSchemaValidationError) -> Response:
        return error_response(422, "validation_error", _validation_message(error))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        response = error_response(status, code, error.description or error.name)
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(DatabaseUnavailable)
    async def database_unavailable(error: DatabaseUnavailable) -> Response:
        log.warning("%s %s: %s", request.method, request.path, error)
        return await api_error(database_unavailable_error())

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        # The request's failure boundary: this request alone ends (500), logged once with
        # its context and counted (``/health/supervisor``).
        user = g.get("user")
        context = {
            "method": request.method,
            "path": request.path[:200],
            "user_id": None if user is None else str(getattr(user, "id", None)),
        }
        failures: ContainedFailures = app.extensions["atrium"].failures
        failures.record("request", error, context)
        return error_response(500, "internal_error", "Something went wrong on our side")
