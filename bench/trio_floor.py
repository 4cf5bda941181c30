"""What an HTTP/1.1 request costs on trio at the least, beside the seam that atrium runs.

    python bench/trio_floor.py [--pin 0,1] [--duration 3] [--rounds 3] [--connections 32]

Sketches, not servers: each serves the hello app of bench/hello_asgi.py from one task per
connection, parses requests with httptools (llhttp, as uvicorn does) or with h11, and
writes the response's head and body in one ``send``. The app runs in the connection's own
task, or (``--spawn``) in a task started for each request, as hypercorn starts one. No
timeouts, size limits, bodies, 100-continue, errors or upgrades: what is left is the
least trio, the parser and the task per request can cost, so the gap between them and
the seam's hello is what hypercorn's protocol layers cost (docs/BENCHMARKS.md, "The
HTTP floor, third pass"). Measured like bench/http_floor.py (server CPU per request,
interleaved rounds, medians); one sketch alone:

    python -m bench.trio_floor --serve --port 8100 [--parser h11] [--spawn]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    add_load_options,
    build_request,
    print_load_average,
    print_run_header,
    process_cpu,
    run_script,
)
from bench.hello_asgi import app  # noqa: E402
from bench.http_floor import HELLO, Scenario, measure, open_hello, pin  # noqa: E402

_RECEIVE_SIZE = 65536

SKETCHES = {
    "sketch: httptools, app in the connection's task": ["--parser", "httptools"],
    "sketch: httptools, a task per request": ["--parser", "httptools", "--spawn"],
    "sketch: h11, app in the connection's task": ["--parser", "h11"],
    "sketch: h11, a task per request": ["--parser", "h11", "--spawn"],
}


async def call_app(stream: trio.SocketStream, path: bytes, spawn: bool) -> None:
    """Run the hello app for one GET of ``path``; its head and body go out in one write."""
    head: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            lines = [b"HTTP/1.1 %d \r\n" % message["status"]]
            lines += [b"%s: %s\r\n" % pair for pair in message["headers"]]
            head.append(b"".join(lines) + b"\r\n")
        else:
            await stream.send_all(head.pop() + message.get("body", b""))

    scope = {"type": "http", "method": "GET", "path": path.decode("latin-1")}
    if spawn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, scope, receive, send)
    else:
        await app(scope, receive, send)  # type: ignore[arg-type]


class HttptoolsRequests:
    """httptools' parser callbacks, collecting the paths of complete requests."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.complete: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.complete.append(self.url)
        self.url = b""


async def serve_httptools(spawn: bool, stream: trio.SocketStream) -> None:
    requests = HttptoolsRequests()
    while data := await stream.receive_some(_RECEIVE_SIZE):
        requests.parser.feed_data(data)
        for path in requests.complete:
            await call_app(stream, path, spawn)
        requests.complete.clear()


async def serve_h11(spawn: bool, stream: trio.SocketStream) -> None:
    import h11

    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE_SIZE)
            connection.receive_data(data)
            if not data:
                return
        elif isinstance(event, h11.Request):
            await call_app(stream, event.target, spawn)
            # h11 writes its own copy (its state machine must see the response).
            connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"15")]))
            connection.send(h11.Data(data=b"x" * 15))
            connection.send(h11.EndOfMessage())
        elif isinstance(event, h11.EndOfMessage) and connection.our_state is h11.DONE:
            connection.start_next_cycle()
        else:  # the peer closed, or asked to close
            return


async def handle(parser: str, spawn: bool, stream: trio.SocketStream) -> None:
    serve = serve_httptools if parser == "httptools" else serve_h11
    with contextlib.suppress(trio.BrokenResourceError):
        await serve(spawn, stream)


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/trio_floor.py --serve")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--parser", choices=("httptools", "h11"), default="httptools")
    parser.add_argument("--spawn", action="store_true", help="a task for each request")
    args = parser.parse_args(argv)
    handler = partial(handle, args.parser, args.spawn)
    trio.run(partial(trio.serve_tcp, handler, args.port, host=args.host))
    return 0


def main(argv: list[str]) -> int:
    if "--serve" in argv:
        return serve_main(argv)
    parser = argparse.ArgumentParser(prog="bench/trio_floor.py", description=__doc__.split("\n")[0])
    add_load_options(parser)
    parser.set_defaults(duration=3.0, connections=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (3)")
    parser.add_argument("--pin", help="SERVER_CPU,CLIENT_CPU: as in bench/http_floor.py")
    args = parser.parse_args(argv)
    print_run_header(args, f"{args.rounds} rounds, medians; ")
    server_cpu = None
    if args.pin:
        server_cpu, client_cpu = (int(cpu) for cpu in args.pin.split(","))
        os.sched_setaffinity(0, {client_cpu})
    servers = {
        "hello, uvicorn": HELLO["hello, uvicorn"],
        "hello, atrium's seam": HELLO["hello, atrium's seam"],
    }
    for label, options in SKETCHES.items():
        servers[label] = [
            "-m", "bench.trio_floor", "--serve", *options, "--host", HOST, "--port", "{port}",
        ]  # fmt: skip
    scenarios: list[Scenario] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atrium-trio-floor-")))
        for label, server_argv in servers.items():
            port, pid = stack.enter_context(open_hello(label, server_argv, work))
            if server_cpu is not None:
                pin(pid, server_cpu)
            request = build_request("GET", "/", host=f"{HOST}:{port}")
            scenarios.append(Scenario(label, port, request, {"server": process_cpu(pid)}, pid))
        measure(args, scenarios)
    print_load_average("after")
    floor = scenarios[0].cost
    print()
    print(f"{'the hello app on':<50}{'server us/req':>14}{'x uvicorn':>11}  rounds")
    print("-" * 96)
    for s in scenarios:
        rounds = ", ".join(f"{c:.0f}" for c in s.costs)
        print(f"{s.name:<50}{s.cost:>14.0f}{s.cost / floor:>10.1f}x  {rounds}")
    return 0


if __name__ == "__main__":
    run_script(main)
