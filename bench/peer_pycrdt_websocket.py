"""The Python peer in bench/documents.py: pycrdt-websocket served by hypercorn on trio.

    python bench/peer_pycrdt_websocket.py --port 8103 [--host 127.0.0.1]

(needs the ``bench`` extra: ``pip install -e '.[bench]'``). pycrdt-websocket as it ships:
a ``WebsocketServer`` (rooms in memory, no store, no authentication) behind its
``ASGIServer``, served by ``hypercorn.trio.serve`` with hypercorn's defaults and no access
log. Any path is a room; y-websocket clients connect to ``ws://host:port/<room>``.
pycrdt-websocket is written on anyio, so it runs on trio unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's ``http`` (which hypercorn imports).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

import trio  # noqa: E402
from hypercorn.config import Config  # noqa: E402
from hypercorn.trio import serve  # noqa: E402
from pycrdt.websocket import ASGIServer, WebsocketServer  # noqa: E402


async def run(host: str, port: int) -> None:
    websocket_server = WebsocketServer()
    app = ASGIServer(websocket_server)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    async with websocket_server:
        await serve(app, config, mode="asgi")  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/peer_pycrdt_websocket.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8103)
    args = parser.parse_args()
    trio.run(run, args.host, args.port)


if __name__ == "__main__":
    main()
