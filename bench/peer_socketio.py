"""The peer in bench/ws_fanout.py: a minimal python-socketio ASGI app on uvicorn doing a broadcast.

    python -m bench.peer_socketio --port 8102 [--host 127.0.0.1]
        [--ws auto|wsproto|websockets|websockets-sansio]

(from the repository root; needs the ``bench`` extra: ``pip install -e '.[bench]'``).

What atrium's workspace does for a cursor move, and nothing more: a client connects to
``/socket.io/?EIO=4&transport=websocket&room=R`` (plain WebSocket transport, no polling,
no upgrade), sends the socket.io CONNECT packet ``40`` and is put in room ``R`` before the
server answers it (``40{"sid":...}``: the client's "ready"). Every ``cursor`` event a
client sends (``42["cursor",{...}]``) is emitted to everyone else in its room;
python-socketio encodes such a packet once per emit and queues the same bytes to each
receiver, as atrium serialises a broadcast once. No authentication, no validation, no rate
limit, no coalescing: the peer's cost is the floor of its stack.

The server pings every 25 s (engine.io ``2``) and the client answers ``3``. uvicorn runs
with its defaults (``loop="auto"``, ``http="auto"``: uvloop and httptools when installed,
else asyncio and h11) without an access log; ``--ws`` picks its WebSocket protocol
(default ``auto``: websockets-sansio when websockets is installed, else wsproto; plain
``websockets`` is uvicorn's older, deprecated implementation; the websockets package is
not in the ``bench`` extra: ``pip install websockets`` for those two). The first log line
names the implementation in use.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from urllib.parse import parse_qs

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], cors_allowed_origins=[])
app = socketio.ASGIApp(sio)
ROOM: dict[str, str] = {}  # sid -> its room


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    room = parse_qs(environ.get("QUERY_STRING", "")).get("room", ["default"])[0]
    ROOM[sid] = room
    await sio.enter_room(sid, room)


@sio.event
async def disconnect(sid: str, *reason: Any) -> None:
    ROOM.pop(sid, None)


@sio.event
async def cursor(sid: str, data: Any) -> None:
    await sio.emit("cursor", data, room=ROOM[sid], skip_sid=sid)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/peer_socketio.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--ws", choices=("auto", "wsproto", "websockets", "websockets-sansio"), default="auto"
    )
    args = parser.parse_args()
    config = uvicorn.Config(app, host=args.host, port=args.port, ws=args.ws, access_log=False)
    server = uvicorn.Server(config)
    config.load()  # resolves ws="auto" into a protocol class
    logging.getLogger("bench.peer_socketio").warning(
        "uvicorn %s, ws protocol %s, loop %s",
        uvicorn.__version__,
        getattr(config.ws_protocol_class, "__module__", config.ws_protocol_class),
        config.loop,
    )
    server.run()


if __name__ == "__main__":
    main()
