"""What atrium's plain ASGI layers cost every HTTP request, without a server or a socket.

    python bench/http_layers.py [--requests 50000] [--rounds 5]

In one process, a trivial ASGI app (a 200 with a small JSON body) is called directly,
then behind each of the layers every HTTP request passes (``http/app.py:create_asgi``):
``RequestMetrics`` (counts and times it), ``Edge`` (CORS, security headers), ``RequestLog``
(request id, log context, access line), and behind all three as served. The CPU per request
over the bare app's is what the layers add (median of ``--rounds``). A request for
``/api/v1/auth/me`` with a bearer header and no ``Origin``, as the HTTP bench sends it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from atrium.core.metrics import Metrics  # noqa: E402
from atrium.http.edge import Edge  # noqa: E402
from atrium.http.request_log import RequestLog  # noqa: E402
from atrium.http.request_metrics import RequestMetrics  # noqa: E402

App = Callable[[Any, Any, Any], Any]
_BODY = b'{"ok":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11")]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY, "more_body": False})


async def _send(message: Any) -> None:
    pass


async def _receive() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/auth/me",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer x.y.z")],
    }


async def _cpu_per_request(app: App, requests: int) -> float:
    for _ in range(requests // 20):  # warm-up
        await app(_scope(), _receive, _send)
    started = time.process_time()
    for _ in range(requests):
        await app(_scope(), _receive, _send)
    return (time.process_time() - started) / requests * 1e6


def _edge(app: App) -> Edge:
    return Edge(app, production=False, allowed_origins=())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    metrics = Metrics()
    stacks: dict[str, App] = {
        "bare app": _app,
        "RequestMetrics": RequestMetrics(_app, metrics),
        "Edge": _edge(_app),
        "RequestLog + Edge": RequestLog(_edge(_app)),
        "all three (as served)": RequestLog(_edge(RequestMetrics(_app, metrics))),
    }
    figures: dict[str, list[float]] = {name: [] for name in stacks}
    for _ in range(args.rounds):
        for name, app in stacks.items():
            figures[name].append(trio.run(_cpu_per_request, app, args.requests))
    bare = statistics.median(figures["bare app"])
    for name, values in figures.items():
        median = statistics.median(values)
        extra = "" if name == "bare app" else f"  (+{median - bare:.2f} over the bare app)"
        print(f"{name:24s} {median:6.2f} us CPU per request{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
