"""The outermost ASGI layer: each HTTP request's id and its one access line.

Every HTTP response carries ``X-Request-ID``: the client's own when it is well formed
(1-128 characters of ``A-Z a-z 0-9 . _ -``), else a new one (32 hex digits), so a client can
quote it and an operator can find every line of that request. The request's log context
(``atrium.core.logs``) holds the id, method and path from the start, the route template and
the user id once known, and status and duration at the end, when the access line
(logger ``atrium.access``, INFO) is written. It sits outside the Edge layer so that the
responses Edge answers itself (the liveness probe, preflights, a contained 500) are
logged and carry the id too. Headers and bodies are never logged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from ..core.failures import ContainedFailures
from ..core.logs import log_context
from .edge import Edge

access_log = logging.getLogger("atrium.access")

_WELL_FORMED = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's id: its ``X-Request-ID`` when well formed, else a new one (32 hex
    digits, unique to this request)."""
    for name, value in headers:
        if name == b"x-request-id":
            if _WELL_FORMED.fullmatch(value):
                return value.decode("ascii")
            break
    # 128 random bits as 32 hex digits, as a uuid4's hex (which cost four times as much:
    # the UUID object), and nothing to learn from them, unlike a counter.
    return os.urandom(16).hex()


class RequestLog:
    """Gives each HTTP request an id (echoed in ``X-Request-ID``) and one access line."""

    def __init__(self, app: Edge) -> None:
        self.app = app

    @property
    def failures(self) -> ContainedFailures:
        """The contained failures of the Edge layer (the server's connection boundary
        counts there too)."""
        return self.app.failures

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope["headers"])
        echoed = (b"x-request-id", rid.encode("ascii"))
        method, path = scope["method"], scope["path"][:200]
        status: int | None = None
        started = trio.current_time()

        async def send_with_id(message: ASGISendEvent) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message["headers"], echoed]
            await send(message)

        with log_context(request_id=rid, method=method, path=path) as context:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                duration_ms = round((trio.current_time() - started) * 1000, 1)
                context.set(status=status, duration_ms=duration_ms)
                access_log.info(
                    "%s %s %s %.1f ms",
                    method,
                    context.fields.get("route", path),
                    "-" if status is None else status,
                    duration_ms,
                )
