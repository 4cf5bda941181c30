"""Each seam (``atrium.seams``) against the library it leans on: the very names,
signatures and behaviours it relies on, so an upgrade that changes one fails here with the
seam and the library named, not somewhere deep in a server test (or in production)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from collections.abc import Callable
from functools import partial
from typing import Any

import hypercorn.trio
import hypercorn.trio.run
import hypercorn.utils
import pytest
import redis.asyncio
import redis.exceptions
import trio
import trio_asyncio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.udp_server import UDPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from trio_asyncio import _handles as trio_asyncio_handles
from trio_asyncio import _loop as trio_asyncio_loop
from wsproto.events import Message

from atrium.seams import aio_loop, hypercorn_server, redis_wire, wsproto_server
from atrium.seams.wsproto_server import (
    BytesMessage,
    CloseConnection,
    CloseReason,
    Connection,
    ConnectionState,
    ConnectionType,
    H11Handshake,
    Ping,
    Pong,
    RejectConnection,
    RemoteProtocolError,
    Request,
    TextMessage,
)

CAP = 10.0
_UPGRADE = (
    b"GET /ws/x HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def check(ok: object, seam: str, library: str, what: str) -> None:
    assert ok, f"seam atrium.seams.{seam} no longer fits {library}: {what}"


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


# -- hypercorn_server ----------------------------------------------------------------------


def _hypercorn(ok: object, what: str) -> None:
    check(ok, "hypercorn_server", "hypercorn", what)


class _Unseam(ast.NodeTransformer):
    """Our ``worker_serve`` as hypercorn would have it: no docstring, no ``contain``, and
    ``TCPServer`` where we build ``ContainedTCPServer``."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        node.args.kwonlyargs, node.args.kw_defaults = zip(  # type: ignore[assignment]
            *[
                (arg, default)
                for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)
                if arg.arg != "contain"
            ],
            strict=True,
        )
        node.args.kwonlyargs, node.args.kw_defaults = (
            list(node.args.kwonlyargs),
            list(node.args.kw_defaults),
        )
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            node.body = node.body[1:]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if node.args and isinstance(node.args[0], ast.Name):
            if node.args[0].id == "ContainedTCPServer":
                node.args = [ast.Name("TCPServer", ast.Load()), *node.args[2:]]
        return node


def _tree(function: Callable[..., Any]) -> str:
    return ast.dump(ast.parse(textwrap.dedent(inspect.getsource(function))))


def test_hypercorn_worker_serve_is_the_loop_the_seam_copies() -> None:
    """The seam's ``worker_serve`` is hypercorn's, line for line, but for the server class:
    a hypercorn release that changes its serve loop (a fix, a new option) fails here, so
    the copy is brought up to date rather than silently diverging."""
    ours = ast.parse(textwrap.dedent(inspect.getsource(hypercorn_server.worker_serve)))
    ours = _Unseam().visit(ours)
    # Comments (a lint suppression) are not in the tree.
    _hypercorn(
        ast.dump(ours) == _tree(hypercorn.trio.run.worker_serve),
        "hypercorn.trio.run.worker_serve differs from the copy in worker_serve",
    )
    _hypercorn(
        parameters(hypercorn.trio.serve)
        == ["app", "config", "shutdown_trigger", "task_status", "mode"],
        "hypercorn.trio.serve's parameters changed",
    )


def test_hypercorn_names_the_copy_builds_on() -> None:
    _hypercorn(
        parameters(TCPServer.__init__) == ["self", "app", "config", "context", "state", "stream"],
        "TCPServer(app, config, context, state, stream) changed",
    )
    _hypercorn(
        inspect.iscoroutinefunction(TCPServer.run) and parameters(TCPServer.run) == ["self"],
        "TCPServer.run() is no longer a coroutine without arguments",
    )
    _hypercorn(
        parameters(UDPServer.__init__) == ["self", "app", "config", "context", "state", "socket"],
        "UDPServer(app, config, context, state, socket) changed",
    )
    _hypercorn(
        parameters(Lifespan.__init__) == ["self", "app", "config", "state"],
        "Lifespan(app, config, state) changed",
    )
    for name in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        _hypercorn(hasattr(Lifespan, name), f"Lifespan.{name} is gone")
    _hypercorn(
        parameters(WorkerContext.__init__) == ["self", "max_requests"],
        "WorkerContext(max_requests) changed",
    )
    context = WorkerContext(None)
    _hypercorn(
        hasattr(context, "terminate") and hasattr(context, "terminated"),
        "WorkerContext.terminate/terminated are gone",
    )
    for name in ("raise_shutdown", "repr_socket_addr", "ShutdownError", "wrap_app"):
        _hypercorn(hasattr(hypercorn.utils, name), f"hypercorn.utils.{name} is gone")
    _hypercorn(
        parameters(hypercorn.utils.wrap_app) == ["app", "wsgi_max_body_size", "mode"],
        "hypercorn.utils.wrap_app(app, wsgi_max_body_size, mode) changed",
    )
    for name in ("create_sockets", "create_ssl_context", "set_statsd_logger_class"):
        _hypercorn(hasattr(Config, name), f"Config.{name} is gone")


async def _app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        await receive()
    else:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def _exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
            if b"ok" in received or b"101" in received:
                break
        return received


async def test_hypercorn_a_failing_connection_is_contained_and_the_server_goes_on() -> None:
    """Frame bytes pipelined behind an upgrade make hypercorn's protocol code raise out
    of the connection (h11's LocalProtocolError); the seam hands it to ``contain`` and the
    server answers the next request."""
    contained: list[BaseException] = []
    told = trio.Event()

    def contain(group: BaseException) -> None:
        contained.append(group)
        told.set()

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    try:
        with trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    partial(
                        hypercorn_server.serve,
                        _app,
                        config,
                        contain=contain,
                        shutdown_trigger=trio.sleep_forever,
                    )
                )
                port = int(binds[0].rpartition(":")[2])
                await _exchange(port, _UPGRADE + b"\x81\x05hello")
                await told.wait()  # the connection's task ends after its socket
                answer = await _exchange(port, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as crash:  # the server itself ended
        pytest.fail(
            f"seam atrium.seams.hypercorn_server (hypercorn): the server crashed: {crash!r}"
        )
    _hypercorn(b" 200 " in answer, "the server did not answer after a contained failure")
    _hypercorn(
        len(contained) == 1 and isinstance(contained[0], BaseExceptionGroup),
        f"contain was told {contained!r}, not of one exception group",
    )


# -- aio_loop ------------------------------------------------------------------------------


def _trio_asyncio(ok: object, what: str) -> None:
    check(ok, "aio_loop", "trio-asyncio", what)


# The private methods BatchingEventLoop overrides, with the parameters it gives them: each
# must still exist on trio-asyncio's loop, called the same way, or ours is never called.
_OVERRIDDEN = {
    "_queue_handle": ["self", "handle"],
    "_handle_sig": ["self", "sig", "_"],
    "_timer_handle_cancelled": ["self", "handle"],
    "_main_loop_init": ["self", "nursery"],
    "_main_loop_one": ["self", "no_wait"],
    "_cancel_fds": ["self"],
}
# The private state of trio-asyncio's (and asyncio's) loop that it reads.
_STATE = ("_selector", "_token", "_nursery", "_close_files", "_signal_handlers", "_debug")


def test_trio_asyncio_private_names_the_loop_overrides() -> None:
    base = trio_asyncio.TrioEventLoop
    for name, expected in _OVERRIDDEN.items():
        _trio_asyncio(hasattr(base, name), f"TrioEventLoop.{name} is gone")
        _trio_asyncio(
            parameters(getattr(base, name)) == expected,
            f"TrioEventLoop.{name}{tuple(expected)} changed",
        )
    _trio_asyncio(
        parameters(base._add_callback)[:2] == ["self", "handle"],
        "TrioEventLoop._add_callback(handle) changed",
    )
    _trio_asyncio(
        parameters(base.__init__) == ["self", "queue_len"], "TrioEventLoop(queue_len) changed"
    )
    for name in ("_check_closed", "_check_callback", "_process_events", "stop"):
        _trio_asyncio(hasattr(base, name), f"TrioEventLoop.{name} is gone")
    for name in ("_add_reader", "_add_writer"):
        _trio_asyncio(
            hasattr(asyncio.selector_events.BaseSelectorEventLoop, name),
            f"asyncio's BaseSelectorEventLoop.{name} is gone",
        )
    _trio_asyncio(
        trio_asyncio_loop.TrioEventLoop is base, "trio_asyncio._loop.TrioEventLoop is not the loop"
    )
    handle = trio_asyncio_handles.AsyncHandle
    _trio_asyncio(
        hasattr(handle, "_run") and "self._started" in inspect.getsource(handle.__init__),
        "trio_asyncio._handles.AsyncHandle._run/_started are gone",
    )
    # open_loop builds its loop from the module's global TrioEventLoop, by name.
    code = inspect.unwrap(trio_asyncio.open_loop).__code__
    _trio_asyncio(
        "TrioEventLoop" in code.co_names and parameters(trio_asyncio.open_loop) == ["queue_len"],
        "trio_asyncio.open_loop(queue_len) no longer builds trio_asyncio._loop.TrioEventLoop",
    )


async def test_trio_asyncio_open_loop_builds_the_seams_loop_and_runs_asyncio() -> None:
    with trio.fail_after(CAP):
        async with aio_loop.open_loop() as loop:
            _trio_asyncio(
                type(loop) is aio_loop.BatchingEventLoop, "open_loop built another loop class"
            )
            for name in _STATE:
                _trio_asyncio(hasattr(loop, name), f"the loop has no {name}")
            _trio_asyncio(
                trio_asyncio_loop.TrioEventLoop is trio_asyncio.TrioEventLoop,
                "the loop class swap outlived open_loop",
            )
            timer = asyncio.TimerHandle(0.0, print, (), loop, None)
            for name in ("_run", "_cancelled", "_when", "_scheduled"):
                _trio_asyncio(hasattr(timer, name), f"asyncio's TimerHandle has no {name}")

            async def answer() -> int:
                await asyncio.sleep(0)
                return 42

            result = await loop.run_aio_coroutine(answer())
            _trio_asyncio(result == 42, "an asyncio coroutine did not run on the loop")


# -- redis_wire ----------------------------------------------------------------------------


def _redis(ok: object, what: str) -> None:
    check(ok, "redis_wire", "redis-py", what)


def test_redis_connection_methods_the_wire_uses() -> None:
    connection = redis.asyncio.Connection
    for name, expected in {
        "pack_commands": ["self", "commands"],
        "send_packed_command": ["self", "command", "check_health"],
        "disconnect": ["self", "nowait"],
    }.items():
        _redis(
            parameters(getattr(connection, name))[: len(expected)] == expected,
            f"Connection.{name}{tuple(expected[1:])} changed",
        )
    _redis(hasattr(connection, "read_response"), "Connection.read_response is gone")
    pool = redis.asyncio.ConnectionPool
    required = [
        name
        for name, parameter in inspect.signature(pool.get_connection).parameters.items()
        if name != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    _redis(not required, f"ConnectionPool.get_connection() now requires {required}")
    _redis(
        parameters(pool.release) == ["self", "connection"],
        "ConnectionPool.release(connection) changed",
    )
    packed = b"".join(redis.asyncio.Connection().pack_commands([("PING",), ("ECHO", b"x")]))
    _redis(
        packed == b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$1\r\nx\r\n",
        f"pack_commands no longer packs RESP: {packed!r}",
    )


async def test_redis_commands_written_and_skipped_by_hand(aio_loop: None, redis_url: str) -> None:
    """Against a real Redis: ``CLIENT REPLY SKIP`` is taken, and a batch of confirmed and
    skipped ``PUBLISH`` commands leaves the pooled connection in step (the next command
    reads its own answer)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with trio.fail_after(CAP):
            skips = await trio_asyncio.aio_as_trio(redis_wire.replies_can_be_skipped)(client)
            _redis(skips is True, "CLIENT REPLY SKIP was refused or answered")
            messages = [("seams:a", b"1", False), ("seams:b", b"2", True), ("seams:c", b"3", False)]
            await trio_asyncio.aio_as_trio(redis_wire.publish_all)(messages, True, client)
            echoed = await trio_asyncio.aio_as_trio(client.echo)("after")
            _redis(echoed == b"after", f"a pooled connection was left out of step: {echoed!r}")
    finally:
        await trio_asyncio.aio_as_trio(client.aclose)()


# -- wsproto_server ------------------------------------------------------------------------


def _wsproto(ok: object, what: str) -> None:
    check(ok, "wsproto_server", "wsproto", what)


def test_wsproto_text_frames_are_the_ones_wsproto_sends() -> None:
    """``text_frame`` writes what wsproto's own server connection would, in each of the
    three length forms."""
    for size in (2, 125, 126, 65_535, 65_536):  # bytes, at each form's bounds
        text = "é" + "x" * (size - 2)
        ours = wsproto_server.text_frame(text)
        theirs = Connection(ConnectionType.SERVER).send(TextMessage(data=text))
        _wsproto(ours == theirs, f"a {size}-byte text frame differs from wsproto's")


def test_wsproto_binary_frames_are_the_ones_wsproto_sends() -> None:
    """``binary_frame`` (a live document's y-websocket messages) writes what wsproto's own
    server connection would, in each of the three length forms."""
    for size in (0, 125, 126, 65_535, 65_536):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        ours = wsproto_server.binary_frame(data)
        theirs = Connection(ConnectionType.SERVER).send(BytesMessage(data=data))
        _wsproto(ours == theirs, f"a {size}-byte binary frame differs from wsproto's")


def test_client_frame_reads_what_a_wsproto_client_sends() -> None:
    """``client_frame`` reads a client's simple frames as wsproto would (masked by
    wsproto's client, every length form it takes); a frame not yet whole is None; any
    other frame is wsproto's (``NOT_SIMPLE``)."""
    limit = 65_535
    for size in (0, 2, 125, 126, 1000, 65_535):  # bytes
        text = "é" + "x" * (size - 2) if size else ""
        for message, opcode, payload in (
            (TextMessage(data=text), 1, text.encode()),
            (BytesMessage(data=bytes(size)), 2, bytes(size)),
        ):
            frame = Connection(ConnectionType.CLIENT).send(message)
            found = wsproto_server.client_frame(frame + b"next", limit)
            assert found == (opcode, payload, len(frame)), size
            assert wsproto_server.client_frame(frame[:-1], limit) is None
    client = Connection(ConnectionType.CLIENT)
    others = [
        client.send(Ping(b"p")),
        client.send(TextMessage(data="part", message_finished=False)),
        client.send(TextMessage(data="x" * 100_000)),  # a 64-bit length
        Connection(ConnectionType.SERVER).send(TextMessage(data="unmasked")),
        bytes([0xC1, 0x80]) + bytes(4),  # a reserved bit
        client.send(CloseConnection(code=1000)),
    ]
    for frame in others:
        assert wsproto_server.client_frame(frame, limit) is wsproto_server.NOT_SIMPLE
    big = Connection(ConnectionType.CLIENT).send(TextMessage(data="x" * 2000))
    assert wsproto_server.client_frame(big, 1999) is wsproto_server.NOT_SIMPLE  # wsproto's 1009


def test_wsproto_handshake_and_connection_behave_as_the_listener_expects() -> None:
    shake = H11Handshake(ConnectionType.SERVER)
    shake.receive_data(_UPGRADE)
    events = list(shake.events())
    _wsproto(
        len(events) == 1 and isinstance(events[0], Request) and events[0].target == "/ws/x",
        f"the upgrade request is not one Request event: {events!r}",
    )
    bad = H11Handshake(ConnectionType.SERVER)
    try:
        bad.receive_data(b"GET /ws/x HTTP/1.1\r\nHost: test\r\n\r\n")
        list(bad.events())
    except RemoteProtocolError as error:
        _wsproto(
            isinstance(error.event_hint, RejectConnection),
            "RemoteProtocolError.event_hint is no longer a RejectConnection",
        )
    else:
        _wsproto(False, "a request without Upgrade was not refused with RemoteProtocolError")

    server = Connection(ConnectionType.SERVER)
    _wsproto(server.state is ConnectionState.OPEN, "a server Connection does not start OPEN")
    server.receive_data(_masked(0x89, b"p"))
    [ping] = list(server.events())
    _wsproto(
        isinstance(ping, Ping) and isinstance(ping.response(), Pong),
        "Ping.response() is not a Pong",
    )
    server.receive_data(b"\x81\x05hello")  # unmasked: a protocol error
    [failed] = list(server.events())
    _wsproto(
        isinstance(failed, CloseConnection)
        and failed.code == CloseReason.PROTOCOL_ERROR
        and server.state is ConnectionState.OPEN,
        f"a parser failure is no longer a CloseConnection while OPEN: {failed!r}",
    )
    closing = Connection(ConnectionType.SERVER)
    closing.receive_data(_masked(0x88, (1000).to_bytes(2, "big")))
    [close] = list(closing.events())
    _wsproto(
        isinstance(close, CloseConnection)
        and closing.state is ConnectionState.REMOTE_CLOSING
        and isinstance(close.response(), CloseConnection),
        "the peer's close no longer leaves the connection REMOTE_CLOSING",
    )
    ours = Connection(ConnectionType.SERVER)
    ours.send(CloseConnection(CloseReason.MESSAGE_TOO_BIG, "message_too_big"))
    _wsproto(
        ours.state is ConnectionState.LOCAL_CLOSING, "our close no longer leaves LOCAL_CLOSING"
    )
    message = TextMessage(data="x", message_finished=False)
    _wsproto(
        isinstance(message, Message) and not message.message_finished,
        "TextMessage.message_finished is gone",
    )


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client's frame (masked, as RFC 6455 requires), final, with a short payload."""
    key = b"abcd"
    return (
        bytes((opcode, 0x80 | len(payload)))
        + key
        + bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    )
