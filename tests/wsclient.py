"""A small WebSocket test client on trio-websocket: frames in order, batches flattened."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

TIMEOUT = 10.0


class Client:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pending: deque[dict[str, Any]] = deque()

    async def recv(self) -> dict[str, Any]:
        """The next server message (a batch frame yields its messages one by one)."""
        while not self.pending:
            with trio.fail_after(TIMEOUT):
                raw = await self.ws.get_message()
            data = orjson.loads(raw)
            self.pending.extend(data if isinstance(data, list) else [data])
        return self.pending.popleft()

    async def until(self, kind: str) -> dict[str, Any]:
        """Skip messages up to and including the first of type ``kind``."""
        while True:
            message = await self.recv()
            if message["type"] == kind:
                return message

    async def skip_pings_recv(self) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["type"] != "PING":
                return message

    async def send(self, frame: Any) -> None:
        await self.ws.send_message(
            frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        )

    async def closed(self) -> tuple[int, str]:
        """Read until the server closes; return its close code and reason."""
        with trio.fail_after(TIMEOUT):
            try:
                while True:
                    await self.ws.get_message()
                    if self.ws.closed is not None:
                        raise ConnectionClosed(self.ws.closed)
            except ConnectionClosed as closed:
                assert closed.reason is not None
                await self.release()
                return closed.reason.code, closed.reason.reason or ""

    async def release(self) -> None:
        # trio-websocket's client waits for the server's TCP close after a server-initiated
        # close and never closes its own socket (a ResourceWarning); close it here.
        await self.ws._stream.aclose()


@asynccontextmanager
async def connect(
    url: str,
    token: str | None = None,
    *,
    origin: str | None = None,
    queue: int = 1024,
    max_message_size: int = 2**20,
) -> AsyncIterator[Client]:
    headers: list[tuple[bytes, bytes]] = []
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    async with open_websocket_url(
        url, extra_headers=headers, message_queue_size=queue, max_message_size=max_message_size
    ) as ws:
        yield Client(ws)


@asynccontextmanager
async def open_sending_ahead(
    sender: Client, frames: Iterable[Any], *, ahead: int
) -> AsyncIterator[Callable[[], None]]:
    """Send ``frames`` from ``sender`` in the background, never more than ``ahead`` frames
    beyond a reader: the block calls the yielded function once for each of those frames it
    has read. Paced by a reader that keeps up, the sender can put only a client that stopped
    reading behind, however this process's tasks are scheduled. Sending is cancelled when
    the block ends."""
    sent, read = trio.open_memory_channel[None](ahead)

    async def send_all() -> None:
        for frame in frames:
            await sent.send(None)
            await sender.send(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        yield read.receive_nowait
        nursery.cancel_scope.cancel()
