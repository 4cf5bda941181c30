"""The floor of this stack: a bare ASGI app answering 200 ``{"status":"ok"}`` to everything.

Served by hypercorn's trio worker with the same settings atrium uses (no access log, no
Server header), so the gap between it and atrium is what Quart and atrium add. With
``--seam``, by atrium's copy of that worker (``atrium.seams.hypercorn_server``, the server
atrium runs); the same ``app`` under uvicorn is the peer's floor:

    python -m bench.hello_asgi --port 8100 [--seam]     (from the repository root)
    python -m uvicorn bench.hello_asgi:app --loop uvloop --http httptools --port 8100
"""

from __future__ import annotations

import argparse
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)

_BODY = b'{"status":"ok"}'
_START: HTTPResponseStartEvent = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))],
}
_RESPONSE: HTTPResponseBodyEvent = {"type": "http.response.body", "body": _BODY, "more_body": False}


async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """ASGI 3 entry point: lifespan is acknowledged, every HTTP request gets the body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await send(_START)
        await send(_RESPONSE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--seam", action="store_true", help="serve with atrium's copy of hypercorn's trio worker"
    )
    parser.add_argument(
        "--parser",
        choices=("h11", "httptools"),
        default="h11",
        help="with --seam: its HTTP/1.1 parser (atrium's HTTP_PARSER)",
    )
    args = parser.parse_args()
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    config.include_server_header = False
    if args.seam:
        from atrium.seams import hypercorn_server

        serve_seam = partial(hypercorn_server.serve, contain=_raise, parser=args.parser)
        trio.run(serve_seam, app, config)
    else:
        trio.run(serve, app, config)


def _raise(group: BaseException) -> None:
    raise group


if __name__ == "__main__":
    main()
