"""The main port's per-delivery path without sockets: atrium's part and hypercorn's part.

    python bench/ws_path.py [--receivers 100] [--messages 2000] [--rounds 5]

In one process, ``--receivers`` live connections (``realtime._LiveConnection``, its real
send task and ``Outbox``) each over the real ASGI adapter (``http/ws.AsgiConnection``), whose
``send`` goes to one of:

- ``null``: an ASGI send that returns at once: atrium's own cost per delivery (the
  outbox, waking the send task, the send loop, the adapter) plus trio's task switch;
- ``hypercorn``: hypercorn's ``WSStream.app_send`` of an accepted WebSocket, as the
  server runs it, down to the bytes of the frame (wsproto), whose ``send`` returns at once:
  all of the above plus hypercorn and wsproto, without the socket write.

A sender puts ``--messages`` cursor frames to every outbox (``put_cursor``, as the workspace
actor does for CURSOR_UPDATE), waiting for the send tasks between messages, and the process
CPU per delivery is reported (median of ``--rounds``). A machine shared with other work
inflates every figure alike; compare the two lines, and runs of two commits side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402
from hypercorn.config import Config  # noqa: E402
from hypercorn.protocol.events import Request  # noqa: E402
from hypercorn.protocol.ws_stream import WSStream  # noqa: E402

from atrium.core.config import Settings  # noqa: E402
from atrium.core.metrics import Metrics  # noqa: E402
from atrium.domain.realtime import ConnectionSettings, Handshake, _LiveConnection  # noqa: E402
from atrium.http.ws import AsgiConnection  # noqa: E402

FRAME = (
    '{"type":"CURSOR_UPDATE","user_id":"6f1c2a3e-1111-4a4b-9c9d-0e0f10111213",'
    '"position":{"line":12,"column":1700000000000}}'
)


async def _null_send(_message: Any) -> None:
    return None


async def _receive() -> Any:
    await trio.sleep_forever()


async def _hypercorn_send(config: Config) -> Any:
    """hypercorn's ``app_send`` of one accepted WebSocket stream; frames go nowhere."""

    async def drop(_event: Any) -> None:
        return None

    async def spawn_app(*_args: Any) -> Any:
        return drop  # what the app would be put: nothing runs it here

    stream = WSStream(
        types.SimpleNamespace(),  # app: not called
        config,
        None,  # context
        types.SimpleNamespace(spawn_app=spawn_app),  # task_group
        False,  # tls
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        drop,
        0,
    )
    await stream.handle(
        Request(
            stream_id=1,
            headers=[
                (b"host", b"localhost"),
                (b"connection", b"upgrade"),
                (b"upgrade", b"websocket"),
                (b"sec-websocket-version", b"13"),
                (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            http_version="1.1",
            method="GET",
            raw_path=b"/ws/x",
            state={},
        )
    )
    await stream.app_send({"type": "websocket.accept", "subprotocol": None, "headers": []})
    return stream.app_send


async def measure(kind: str, receivers: int, messages: int) -> float:
    """CPU microseconds per delivery."""
    realtime = types.SimpleNamespace(settings=ConnectionSettings.of(Settings()), metrics=Metrics())
    handshake = Handshake("x", None, {}, {})
    config = Config()
    connections = []
    for _ in range(receivers):
        send = _null_send if kind == "null" else await _hypercorn_send(config)
        connections.append(_LiveConnection(realtime, AsgiConnection(_receive, send), handshake))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        for connection in connections:
            nursery.start_soon(connection._send_loop, nursery.cancel_scope)
        await trio.testing.wait_all_tasks_blocked()
        outboxes = [connection.outbox for connection in connections]
        started = time.process_time()
        for _ in range(messages):
            for key, outbox in enumerate(outboxes):
                outbox.put_cursor(key, FRAME)
            await trio.testing.wait_all_tasks_blocked()
        cpu = time.process_time() - started
        nursery.cancel_scope.cancel()
    return cpu / (messages * receivers) * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/ws_path.py", description=__doc__.split("\n")[0])
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"null": [], "hypercorn": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(trio.run(measure, kind, args.receivers, args.messages))
    for kind, values in results.items():
        print(
            f"{kind:>9}: {statistics.median(values):6.2f} us CPU per delivery"
            f"  ({' '.join(f'{v:.2f}' for v in values)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
