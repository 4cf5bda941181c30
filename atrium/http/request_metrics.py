"""Counts every HTTP request the app answers, by route template, method and status.

A plain ASGI layer between the Edge layer and the QuartTrio app. The route is Quart's
``url_rule`` (``/api/v1/projects/<project_id>``), which the app writes into the scope
(``ROUTE_KEY``) when it matches; a request that matched no route counts as ``unmatched``,
so a scanner's random paths cannot grow the number of series. Answers the Edge layer
gives by itself (the liveness probe, CORS preflights) are not counted.
"""

from __future__ import annotations

import time
from typing import Any, cast

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from prometheus_client import Counter, Histogram

from ..core.metrics import Metrics

ROUTE_KEY = "atrium.route"
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def set_route(scope: object, rule: str) -> None:
    """Record the matched route template in ``scope`` (called by the app)."""
    cast(dict[str, Any], scope)[ROUTE_KEY] = rule


class RequestMetrics:
    """The ASGI layer that counts and times ``app``'s HTTP requests in ``metrics``."""

    def __init__(self, app: ASGIFramework, metrics: Metrics) -> None:
        self.app = app
        self._metrics = metrics
        # Label children bound once per (route, method, status): a label lookup takes a
        # lock and builds a tuple, a dict lookup does not.
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._timers: dict[tuple[str, str], Histogram] = {}

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the Edge layer answers when the app raises before a response

        async def send_status(message: ASGISendEvent) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            self._record(scope, status, started)
            raise
        self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = cast(dict[str, Any], scope).get(ROUTE_KEY, UNMATCHED)
        method = scope.get("method", "")
        if method not in _METHODS:
            method = "other"
        key = (route, method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._metrics.http_requests.labels(
                route, method, str(status)
            )
        counter.inc()
        timer = self._timers.get((route, method))
        if timer is None:
            timer = self._timers[(route, method)] = self._metrics.http_seconds.labels(route, method)
        timer.observe(elapsed)
        self._metrics.recent_requests.observe(elapsed)
