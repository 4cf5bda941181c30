"""The dedicated WebSocket listener on WS_PORT (trio-websocket): same paths, same frames.

For high fan-out deployments a load balancer routes ``/ws/`` here; it skips the ASGI
layers and serves the same protocol through the same ``Realtime``.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import cast

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ..outbox import PARTIAL, REFUSED, SENT
from ..realtime import ConnectionGone, Handshake, Realtime

log = logging.getLogger("atrium.ws")


def text_frame(text: str) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455, server to client)."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class TrioWebsocketConnection:
    """The session's ``Connection`` over a trio-websocket connection, with a direct write.

    trio-websocket keeps the handshake, the reader, pings and the close handshake. Outgoing
    text frames are framed here (no extension is ever negotiated, so a data frame is a
    header and the payload) and written straight to the socket: ``try_send`` from the
    workspace's task when the socket takes them without waiting, ``send`` from the
    session's send task otherwise. One gate orders every writer, trio-websocket's own
    (pongs, the close frame) included: its lock is replaced by a semaphore, which, unlike a
    lock, may be released by another task than the one that took it. A partial direct
    write keeps the gate until the send task has written the rest (``flush``).
    """

    __slots__ = ("_ws", "_stream", "_sock", "_gate", "_pending")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        # trio-websocket serves over a trio.SocketStream; its trio socket wraps the stdlib
        # one, which is non-blocking.
        self._stream = cast(trio.SocketStream, ws._stream)
        self._sock: socket.socket = self._stream.socket._sock  # type: ignore[attr-defined]
        self._gate = trio.Semaphore(1)
        ws._stream_lock = self._gate  # type: ignore[assignment]
        self._pending = b""

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except ConnectionClosed as error:
            raise ConnectionGone() from error

    def try_send(self, text: str) -> int:
        """Write a frame now if the socket takes it without waiting (REFUSED, SENT, PARTIAL)."""
        if self._ws.closed is not None:
            return REFUSED
        try:
            self._gate.acquire_nowait()
        except trio.WouldBlock:
            return REFUSED
        frame = text_frame(text)
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._gate.release()
            return REFUSED  # the send task meets the error and ends the session
        if sent == len(frame):
            self._gate.release()
            return SENT
        self._pending = frame[sent:]
        return PARTIAL

    async def _write(self, data: bytes) -> None:
        # Never tear a frame: if the wait for a writable socket is cancelled, what is left
        # stays in ``_pending`` (and the gate stays taken) for ``flush`` or ``close``.
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                raise ConnectionGone() from error
            view = view[sent:]
            if view:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except BaseException:
                    self._pending = bytes(view)
                    raise

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, b""
        await self._write(pending)
        self._gate.release()

    async def send(self, text: str) -> None:
        if self._ws.closed is not None:
            raise ConnectionGone()
        await self._gate.acquire()
        try:
            await self._write(text_frame(text))
        except BaseException:
            if not self._pending:
                self._gate.release()
            raise
        self._gate.release()
        await trio.lowlevel.checkpoint()

    async def close(self, code: int, reason: str) -> None:
        try:
            if self._pending:
                await self.flush()  # the rest of a frame first, then the close frame
            await self._ws.aclose(code, reason)
        except trio.Cancelled:
            # A peer that does not read the close frame in time: drop the connection.
            await self._abort()
            raise
        except Exception:  # a broken stream: nothing more can be sent
            await self._abort()

    async def _abort(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def _handle(realtime: Realtime, request: WebSocketRequest) -> None:
    """One connection, inside its failure boundary: the handshake here, the session in
    ``Realtime.serve``. An exception never reaches the listener that serves everyone."""
    try:
        path, _, query = request.path.partition("?")
        handshake = Handshake.parse(path, query, request.headers)
        if handshake is None:
            await request.reject(404)
            return
        conn = TrioWebsocketConnection(await request.accept())
    except ConnectionClosed:
        return  # the peer left during the handshake
    except Exception as error:
        realtime.failures.record(
            "connection", error, {"transport": "listener", "path": request.path[:100]}
        )
        return  # trio-websocket closes the connection when its handler returns
    await realtime.serve(conn, handshake, transport="listener")


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
