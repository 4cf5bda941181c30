"""The dedicated WebSocket listener on WS_PORT (trio-websocket): same paths, same frames.

For high fan-out deployments a load balancer routes ``/ws/`` here; it skips the ASGI
layers and serves the same protocol through the same ``Realtime``.
"""

from __future__ import annotations

import logging
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ..session import ConnectionGone, Handshake, Realtime

log = logging.getLogger("atrium.ws")


class TrioWebsocketConnection:
    """The session's ``Connection`` over a trio-websocket connection."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except ConnectionClosed as error:
            raise ConnectionGone() from error

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as error:
            raise ConnectionGone() from error

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.aclose(code, reason)
        except Exception:  # a broken stream: nothing left to close
            return


def parse_target(target: str) -> tuple[str, str | None, dict[str, str]] | None:
    """``(project_id, user_id, query)`` for ``/ws/{project_id}[/{user_id}]``, else None."""
    parts = urlsplit(target)
    segments = parts.path.strip("/").split("/")
    if len(segments) not in (2, 3) or segments[0] != "ws" or not all(segments):
        return None
    user_id = segments[2] if len(segments) == 3 else None
    return segments[1], user_id, dict(parse_qsl(parts.query))


async def _handle(realtime: Realtime, request: WebSocketRequest) -> None:
    target = parse_target(request.path)
    if target is None:
        await request.reject(404)
        return
    project_id, user_id, query = target
    ws = await request.accept()
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    await realtime.serve(
        TrioWebsocketConnection(ws), Handshake(project_id, user_id, query, headers)
    )


async def serve_listener(
    realtime: Realtime,
    host: str,
    port: int,
    *,
    max_message_size: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve workspaces on ``host:port`` until cancelled; ``started(port)`` once listening."""

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                partial(_handle, realtime),
                host,
                port,
                None,
                max_message_size=max_message_size,
            )
        )
        log.info("WebSocket listener on ws://%s:%s/ws/", host, server.port)
        task_status.started(server.port)
