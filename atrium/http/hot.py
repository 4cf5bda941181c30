"""The hottest reads as plain ASGI routes beside Quart, as WebSockets are (``ws.py``).

``GET /api/v1/auth/me`` and ``GET /api/v1/projects/`` are what clients poll. Through
Quart, a request, its response, two contexts, the hooks and a nursery of two tasks cost
about a quarter of the whole request (docs/BENCHMARKS.md, issue 11), more than the
route's own work. Here they run the same code as their Quart views (``sign_in``, the
session and project caches, the same bodies) with none of that.

Only requests this layer understands completely are taken: ``GET``, no body, and a query
string of at most ``limit`` and ``offset`` once each, as plain decimal numbers within
their bounds. Everything else (``HEAD``, other parameters, a malformed or out-of-range
value, a body) goes to the Quart view, which answers it as it always has, 422s included;
the views also document the routes (``/openapi.json``). Both answer with the same status,
body and headers (tests/test_hot_routes.py compares them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from pydantic import BaseModel, ValidationError

from ..core.logs import bind
from ..core.outages import DatabaseUnavailable
from ..domain.accounts import User
from ..domain.services import Services
from .auth import me_body
from .edge import send_response
from .errors import ApiError, database_unavailable_error
from .json import dumps_bytes, error_body
from .projects import list_page
from .request_metrics import set_route
from .schemas import ProjectListQuery
from .security import sign_in

log = logging.getLogger("atrium.http")

Answer = Callable[[Services, User, Any], Awaitable[Any]]
"""A route's work once the caller is signed in (and its query, validated): the JSON value
of its 200."""

# A query parameter as this layer takes it: a key it knows, once, a plain decimal value.
_PARAMETER = re.compile(rb"([a-z]+)=(0|[1-9][0-9]{0,9})")
_JSON = (b"content-type", b"application/json")


async def _me(svc: Services, user: User, query: None) -> Any:
    return me_body(user).model_dump()


async def _projects(svc: Services, user: User, query: ProjectListQuery) -> Any:
    return await list_page(svc, user, query)


class _Route:
    __slots__ = ("answer", "model", "parameters", "rule")

    def __init__(self, rule: str, answer: Answer, model: type[BaseModel] | None = None) -> None:
        self.rule = rule  # Quart's rule: the route's name in metrics and access lines
        self.answer = answer
        self.model = model
        fields = model.model_fields if model is not None else {}
        self.parameters = frozenset(name.encode() for name in fields)

    def query(self, raw: bytes) -> tuple[bool, BaseModel | None]:
        """``(True, the validated query)`` when this layer can take ``raw``, else
        ``(False, None)``: Quart's view answers it."""
        values: dict[str, int] = {}
        for part in raw.split(b"&") if raw else ():
            match = _PARAMETER.fullmatch(part)
            if match is None or match[1] not in self.parameters:
                return False, None
            key = match[1].decode()
            if key in values:
                return False, None
            values[key] = int(match[2])
        if self.model is None:
            return True, None
        try:
            return True, self.model.model_validate(values)
        except ValidationError:
            return False, None


class HotRoutes:
    """Answers the hot routes' plain requests; hands every other request to ``app``."""

    def __init__(self, app: ASGIFramework, svc: Services) -> None:
        self.app = app
        self._svc = svc
        me = _Route("/api/v1/auth/me", _me)
        projects = _Route("/api/v1/projects/", _projects, ProjectListQuery)
        # Quart serves both spellings of the project list (``strict_slashes`` off).
        self._routes = {
            "/api/v1/auth/me": me,
            "/api/v1/projects/": projects,
            "/api/v1/projects": projects,
        }

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            route = self._routes.get(scope["path"])
            if route is not None:
                takes, query = route.query(scope["query_string"])
                authorization = _authorization(scope["headers"]) if takes else None
                if authorization is not None:
                    await self._answer(scope, send, route, query, authorization)
                    return
        await self.app(scope, receive, send)

    async def _answer(
        self,
        scope: HTTPScope,
        send: ASGISendCallable,
        route: _Route,
        query: BaseModel | None,
        authorization: str,
    ) -> None:
        set_route(scope, route.rule)
        bind(route=route.rule)
        try:
            signed = await sign_in(self._svc, authorization)
            body = dumps_bytes(await route.answer(self._svc, signed.user, query))
            status, extra = 200, signed.rate.headers()
        except DatabaseUnavailable as error:
            log.warning("GET %s: %s", scope["path"], error)
            status, body, extra = _error(database_unavailable_error())
        except ApiError as error:
            status, body, extra = _error(error)
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()]
        await send_response(send, status, headers, body)


def _error(error: ApiError) -> tuple[int, bytes, dict[str, str]]:
    return error.status, error_body(error.code, error.message), error.headers


def _authorization(headers: Any) -> str | None:
    """The ``Authorization`` value ("" when absent), or None when the request has a
    body (Quart's to read and ignore)."""
    authorization = ""
    seen = False
    for name, value in headers:
        if name == b"authorization" and not seen:
            authorization, seen = value.decode("latin-1"), True
        elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return None
    return authorization
