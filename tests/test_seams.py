"""Each seam (``atrium.seams``) against the library it leans on: the very names,
signatures and behaviours it relies on, so an upgrade that changes one fails here with the
seam and the library named, not somewhere deep in a server test (or in production)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.trio
import hypercorn.trio.run
import hypercorn.utils
import pytest
import redis.asyncio
import redis.exceptions
import trio
import trio.testing
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

from atrium.seams import aio_loop, hypercorn_server, llhttp_protocol, redis_wire, wsproto_server
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
# The seam's two HTTP/1.1 protocols (HTTP_PARSER): hypercorn's on h11, atrium's on llhttp.
PARSERS = pytest.mark.parametrize("parser", ["h11", "httptools"])
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
    """Our ``worker_serve`` as hypercorn would have it: no docstring, no ``contain`` or
    ``parser``, and ``TCPServer`` where we build ``ContainedTCPServer``."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        node.args.kwonlyargs, node.args.kw_defaults = zip(  # type: ignore[assignment]
            *[
                (arg, default)
                for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)
                if arg.arg not in ("contain", "parser")
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
                node.keywords = [k for k in node.keywords if k.arg != "parser"]
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


async def _serve_seam(
    nursery: trio.Nursery,
    app: Any,
    config: Config,
    contain: hypercorn_server.Contain,
    parser: hypercorn_server.Parser = "h11",
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] = trio.sleep_forever,
    graceful_timeout: float = 0.1,
) -> int:
    """The seam's server on port 0 in ``nursery`` (parsing with ``parser``), shutting down
    gracefully once ``shutdown_trigger`` returns; returns the port."""
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = graceful_timeout
    binds = await nursery.start(
        partial(
            hypercorn_server.serve,
            app,
            config,
            contain=contain,
            parser=parser,
            shutdown_trigger=shutdown_trigger,
        )
    )
    return int(binds[0].rpartition(":")[2])


async def _serve_until(
    nursery: trio.Nursery, app: Any, parser: hypercorn_server.Parser, shutdown: trio.Event
) -> int:
    """The seam's server, shutting down gracefully once ``shutdown`` is set; its keep-alive
    (50 s) and graceful (500 s) timeouts are long enough that neither ends a test's
    connections before the shutdown does. Returns the port."""
    config = Config()
    config.keep_alive_timeout = 50
    return await _serve_seam(
        nursery,
        app,
        config,
        print,
        parser,
        shutdown_trigger=shutdown.wait,
        graceful_timeout=500,
    )


class _BrokenStream:
    """A connection whose peer address cannot be read: ``TCPServer.run`` lets the error out."""

    class socket:  # noqa: N801  # the attribute hypercorn reads
        family = 2

        @staticmethod
        def getpeername() -> tuple[str, int]:
            raise ValueError("no peer")

    closed = False

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


async def test_hypercorn_a_failing_connection_is_contained() -> None:
    """What one connection lets out of hypercorn's code goes to ``contain`` (as an
    exception group), after the connection's stream is closed."""
    contained: list[BaseException] = []
    stream = _BrokenStream()
    server = hypercorn_server.ContainedTCPServer(
        contained.append, _app, Config(), WorkerContext(None), {}, stream
    )
    await server.run()
    _hypercorn(stream.closed, "the failed connection's stream was not closed")
    _hypercorn(
        len(contained) == 1
        and isinstance(contained[0], BaseExceptionGroup)
        and contained[0].subgroup(ValueError) is not None,
        f"contain was told {contained!r}, not of one exception group",
    )


@PARSERS
async def test_hypercorn_frames_pipelined_behind_an_upgrade_fail_only_the_request(
    parser: hypercorn_server.Parser,
) -> None:
    """Frame bytes pipelined behind an upgrade, before the 101: hypercorn answers 400 and,
    between the 400's head and its end, let the app's accept put h11 in its ERROR state,
    so the connection's task raised (contained). The seam writes a response whole, with no
    checkpoint between its parts: nothing is raised, the client gets the 400, and the
    server answers the next request."""
    contained: list[BaseException] = []
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _app, Config(), contained.append, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(_UPGRADE + b"\x81\x05hello")
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some()
            after = await _exchange(port, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            nursery.cancel_scope.cancel()
    _hypercorn(answer.startswith(b"HTTP/1.1 400 "), f"answered {answer[:40]!r}")
    _hypercorn(not contained, f"a connection let out {contained!r}")
    _hypercorn(b" 200 " in after, "the server did not answer the next request")


class _Unchanged(ast.NodeTransformer):
    """A seam method as hypercorn has it: no docstring, and hypercorn's statements where
    the seam has its own (``replace``: ast.dump of ours -> ast.dump of hypercorn's)."""

    def __init__(self, replace: dict[str, str]) -> None:
        self.replace = replace

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AsyncFunctionDef:
        self.generic_visit(node)
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            node.body = node.body[1:]
        node.name = "run" if node.name == "_run" else node.name
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for _, value in ast.iter_fields(node):
            if isinstance(value, list):
                value[:] = [
                    statement
                    for item in value
                    for statement in (
                        ast.parse(self.replace[ast.dump(item)]).body
                        if isinstance(item, ast.stmt) and ast.dump(item) in self.replace
                        else [item]
                    )
                ]
        return super().generic_visit(node)


def _statement(source: str) -> str:
    return ast.dump(ast.parse(textwrap.dedent(source)).body[0])


_PROTOCOL = """
self.protocol = ProtocolWrapper(
    self.app, self.config, self.context, task_group, ConnectionState(self.state), ssl, client,
    server, self.protocol_send, alpn_protocol, {}
)
"""


def test_hypercorn_tcp_server_run_is_the_one_the_seam_copies() -> None:
    """``ContainedTCPServer._run`` and ``_read_data`` are hypercorn's ``TCPServer.run`` and
    ``_read_data`` but for the keep-alive task (started, and cancelled once reading ends),
    the ``parser`` it hands the protocol, and the timeout-less read: a release that changes
    either fails here, so the copies are brought up to date."""
    keep_alive = {
        _statement("self._task_group.spawn(self._keep_alive)"): (
            "await self.idle_task.restart(self._task_group, self._idle_timeout)"
        ),
        _statement("self._keep_alive_task_scope.cancel()"): "",
        # and the parser it hands the protocol
        _statement(_PROTOCOL.format("self._parser")): _PROTOCOL.format(""),
    }
    ours = ast.parse(textwrap.dedent(inspect.getsource(hypercorn_server.ContainedTCPServer._run)))
    _hypercorn(
        ast.dump(_Unchanged(keep_alive).visit(ours)) == _tree(TCPServer.run),
        "hypercorn.trio.tcp_server.TCPServer.run differs from ContainedTCPServer._run",
    )
    untimed = {
        _statement("read_timeout = self.config.read_timeout"): "",
        _statement(
            """
            if read_timeout is None:
                data = await self.stream.receive_some(MAX_RECV)
            else:
                with trio.fail_after(read_timeout):
                    data = await self.stream.receive_some(MAX_RECV)
            """
        ): (
            "with trio.fail_after(self.config.read_timeout or inf):\n"
            "    data = await self.stream.receive_some(MAX_RECV)"
        ),
    }
    ours = ast.parse(
        textwrap.dedent(inspect.getsource(hypercorn_server.ContainedTCPServer._read_data))
    )
    _hypercorn(
        ast.dump(_Unchanged(untimed).visit(ours)) == _tree(TCPServer._read_data),
        "hypercorn.trio.tcp_server.TCPServer._read_data differs from the seam's",
    )


def test_httptools_parser_the_seam_builds_on() -> None:
    """``seams/llhttp_protocol.py``: the parser's methods, each callback it implements
    called in order with what it reads, ``HttpParserUpgrade`` with the offset of what
    follows an upgrade's head, ``HttpParserError`` carrying a callback's exception as
    its context, and ``should_upgrade`` already set in ``on_headers_complete``."""
    import httptools

    def check_httptools(ok: object, what: str) -> None:
        check(ok, "llhttp_protocol", "httptools", what)

    calls: list[tuple[str, Any]] = []

    class Callbacks:
        parser: httptools.HttpRequestParser

        def on_message_begin(self) -> None:
            calls.append(("begin", None))

        def on_url(self, url: bytes) -> None:
            calls.append(("url", url))

        def on_header(self, name: bytes, value: bytes) -> None:
            calls.append(("header", (name, value)))

        def on_headers_complete(self) -> None:
            parser = self.parser
            version, upgrade = parser.get_http_version(), parser.should_upgrade()
            calls.append(("headers", (parser.get_method(), version, upgrade)))

        def on_body(self, body: bytes) -> None:
            calls.append(("body", body))

        def on_chunk_header(self) -> None:
            calls.append(("chunk", None))

        def on_message_complete(self) -> None:
            calls.append(("complete", None))

    callbacks = Callbacks()
    callbacks.parser = parser = httptools.HttpRequestParser(callbacks)
    parser.feed_data(
        b"POST /a?b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    check_httptools(
        calls
        == [
            ("begin", None),
            ("url", b"/a?b"),
            ("header", (b"Host", b"x")),
            ("header", (b"Transfer-Encoding", b"chunked")),
            ("headers", (b"POST", "1.1", False)),
            ("chunk", None),
            ("body", b"hi"),
            ("chunk", None),
            ("complete", None),
        ],
        f"a chunked request was read as {calls!r}",
    )
    calls.clear()
    upgrade = _UPGRADE + b"\x81\x05hello"
    try:
        parser.feed_data(upgrade)
    except httptools.HttpParserUpgrade as error:
        offset = error.args[0]
    else:
        offset = None
    check_httptools(offset == len(_UPGRADE), f"an upgrade's head ends at {offset!r}")
    check_httptools(("headers", (b"GET", "1.1", True)) in calls, f"an upgrade read {calls!r}")

    class Refusing(Callbacks):
        def on_headers_complete(self) -> None:
            raise LookupError("refused")

    refusing = httptools.HttpRequestParser(Refusing())
    try:
        refusing.feed_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    except httptools.HttpParserError as error:
        context: BaseException | None = error.__context__
    else:
        context = None
    check_httptools(isinstance(context, LookupError), f"a callback's error came as {context!r}")


def test_hypercorn_protocol_names_the_seam_builds_on() -> None:
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h11 import H11Protocol

    _hypercorn(
        parameters(ProtocolWrapper.__init__)
        == [
            "self",
            "app",
            "config",
            "context",
            "task_group",
            "state",
            "ssl",
            "client",
            "server",
            "send",
            "alpn_protocol",
        ],
        "ProtocolWrapper(app, ..., send, alpn_protocol) changed",
    )
    _hypercorn(
        parameters(H11Protocol.__init__)
        == [
            "self",
            "app",
            "config",
            "context",
            "task_group",
            "connection_state",
            "ssl",
            "client",
            "server",
            "send",
        ],
        "H11Protocol(app, ..., send) changed",
    )
    for name in ("stream_send", "_send_h11_event"):
        _hypercorn(
            parameters(getattr(H11Protocol, name)) == ["self", "event"],
            f"H11Protocol.{name}(event) changed",
        )
    _hypercorn(
        parameters(H11Protocol._send_error_response) == ["self", "status_code"],
        "H11Protocol._send_error_response(status_code) changed",
    )
    _hypercorn(
        "await self._send_error_response(error.error_status_hint)"
        in inspect.getsource(H11Protocol._handle_events),
        "H11Protocol no longer answers a request h11 refuses with _send_error_response",
    )
    _hypercorn(
        parameters(H11Protocol._check_protocol) == ["self", "event"]
        and "H2CProtocolRequiredError" in inspect.getsource(H11Protocol._check_protocol),
        "H11Protocol._check_protocol(event) no longer switches to h2c",
    )
    source = inspect.getsource(H11Protocol.stream_send)
    for piece in (
        'chain(event.headers, self.config.response_headers("h11"))',
        "self.keep_alive_requests >= self.config.keep_alive_max_requests",
        "await self._send_h11_event(h11.Data(data=event.data))",
        "await self._send_h11_event(h11.EndOfMessage())",
    ):
        _hypercorn(piece in source, f"H11Protocol.stream_send no longer has {piece}")
    _hypercorn(
        "await self.idle_task.restart(self._task_group, self._idle_timeout)"
        in inspect.getsource(TCPServer.protocol_send),
        "TCPServer.protocol_send no longer restarts the idle task on Updated(idle=True)",
    )


async def _one_response(body: bytes, more: list[bytes]) -> list[bytes]:
    """The writes the seam's HTTP/1.1 protocol makes for one GET answered with ``body``
    then the chunks ``more``, without a socket."""
    from hypercorn.events import RawData
    from hypercorn.protocol.events import Body, EndBody, Response

    writes: list[bytes] = []

    async def send(event: Any) -> None:
        if isinstance(event, RawData):
            writes.append(event.data)

    config = Config()
    config.include_date_header = False
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        task_group = hypercorn.trio.task_group.TaskGroup()
        task_group._nursery = nursery
        protocol = hypercorn_server.H11Protocol(
            _app, config, WorkerContext(None), task_group, {}, False, None, None, send
        )
        protocol.connection.receive_data(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        protocol.connection.next_event()
        headers = [] if more else [(b"content-length", b"%d" % len(body))]
        await protocol.stream_send(Response(stream_id=1, headers=headers, status_code=200))
        for chunk in [body, *more]:
            await protocol.stream_send(Body(stream_id=1, data=chunk))
        await protocol.stream_send(EndBody(stream_id=1))
        nursery.cancel_scope.cancel()
    return writes


async def test_hypercorn_seam_writes_a_response_head_with_its_body() -> None:
    whole = await _one_response(b"ok", [])
    _hypercorn(
        whole == [b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok"],
        f"one response with a length is one write: {whole!r}",
    )
    chunked = await _one_response(b"a", [b"b"])
    _hypercorn(
        chunked
        == [
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
            b"1\r\nb\r\n",
            b"0\r\n\r\n",
        ],
        f"a streamed response is written as it comes: {chunked!r}",
    )


@PARSERS
async def test_hypercorn_seam_still_upgrades_to_h2c(parser: hypercorn_server.Parser) -> None:
    """An h2c upgrade through the seam's HTTP/1.1 protocol is still switched to HTTP/2
    (hypercorn's 101)."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _app, Config(), print, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                )
                answer = await stream.receive_some()
            nursery.cancel_scope.cancel()
    _hypercorn(answer.startswith(b"HTTP/1.1 101 "), f"an h2c upgrade was answered {answer!r}")


def test_h11_header_checks_the_seam_remembers() -> None:
    """``validated_response`` checks a header pair with h11's own expressions once: the
    names it reads in h11 exist, the response it builds is written as h11's own, an illegal
    name or value is refused as h11 refuses it, and what it remembers stays bounded."""
    import h11
    import h11._headers

    def check_h11(ok: object, what: str) -> None:
        check(ok, "hypercorn_server", "h11", what)

    for name in ("_field_name_re", "_field_value_re"):
        check_h11(hasattr(h11._headers, name), f"h11._headers.{name} is gone")
    check_h11("_parsed" in parameters(h11.Response.__init__), "h11.Response(_parsed=) is gone")
    headers = [
        (b"content-type", b"application/json"),
        (b"Content-Length", b"2"),
        (b"x-request-id", b"abc"),
        (b"date", b"Mon, 07 Dec 2026 06:00:00 GMT"),
    ]

    def written(response: h11.Response) -> bytes:
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        connection.next_event()
        return connection.send(response)

    for _ in range(2):  # checked, then remembered
        ours = written(hypercorn_server.validated_response(headers, 200))
        check_h11(
            ours == written(h11.Response(headers=headers, status_code=200)),
            f"the seam's response is written differently: {ours!r}",
        )
    for bad in ([(b"x-bad", b"a\r\nb")], [(b"x bad", b"a")], [(b"", b"a")]):
        with pytest.raises(h11.LocalProtocolError):
            h11.Response(headers=bad, status_code=200)
        with pytest.raises(h11.LocalProtocolError):
            hypercorn_server.validated_response(bad, 200)
    for n in range(llhttp_protocol._VALID_HEADERS_MAX + 10):
        hypercorn_server.validated_response([(b"x-request-id", b"%d" % n)], 200)
    check_h11(
        len(llhttp_protocol._VALID_HEADERS) <= llhttp_protocol._VALID_HEADERS_MAX,
        "the remembered header pairs grew past their bound",
    )


async def test_hypercorn_seam_app_inbox_is_a_bounded_fifo() -> None:
    """What the app reads through ``AppInbox`` comes in order; a put waits while the inbox
    is full (hypercorn's memory channel of ``max_app_queue_size``), a get for a message."""
    inbox = hypercorn_server.AppInbox(2)
    got: list[Any] = []
    messages: list[Any] = [{"type": "http.request", "body": b"%d" % n} for n in range(5)]

    async def put_all() -> None:
        for message in messages:
            await inbox.put(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_all)
        await trio.testing.wait_all_tasks_blocked()
        _hypercorn(len(inbox._messages) == 2, "a put did not wait while the inbox was full")
        for _ in messages:
            got.append(await inbox.get())
        late: list[Any] = []

        async def get_one() -> None:
            late.append(await inbox.get())

        nursery.start_soon(get_one)
        await trio.testing.wait_all_tasks_blocked()
        _hypercorn(not late, "a get on an empty inbox did not wait")
        await inbox.put(messages[0])
        await trio.testing.wait_all_tasks_blocked()
        _hypercorn(late == [messages[0]], "a waiting get did not take the next put")
    _hypercorn(got == messages, f"the app read {got!r}")


async def _slow_app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """``ok`` with its length, after 60 s for ``/slow``."""
    if scope["type"] != "http":
        await _app(scope, receive, send)
        return
    if scope["path"] == "/slow":
        await trio.sleep(60)
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def _request(stream: trio.SocketStream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    received = b""
    while b"ok" not in received:
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def _closed(stream: trio.SocketStream) -> bool:
    return await stream.receive_some() == b""


@PARSERS
async def test_hypercorn_seam_keep_alive_closes_idle_connections_only(
    mock_clock: trio.testing.MockClock, parser: hypercorn_server.Parser
) -> None:
    """The keep-alive timer (one task whose deadline moves): an idle connection closes after
    ``keep_alive_timeout``, a request in flight longer than that is answered, and the timer
    runs again once it is."""
    mock_clock.autojump_threshold = 0.1  # real sockets: let loopback I/O land first
    config = Config()
    config.keep_alive_timeout = 5
    with trio.fail_after(CAP * 100):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _slow_app, config, print, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            answer = await _request(stream, "/slow")
            _hypercorn(b" 200 " in answer, f"a 60 s request was not answered: {answer!r}")
            answered = trio.current_time()
            _hypercorn(answered - started >= 60, "the slow request was not slow")
            _hypercorn(await _closed(stream), "the idle connection was not closed")
            await stream.aclose()
            idle = trio.current_time() - answered
            _hypercorn(5 <= idle < 6, f"closed after {idle:.1f} s idle, not keep_alive_timeout")
            nursery.cancel_scope.cancel()


@PARSERS
async def test_hypercorn_seam_shutdown_closes_idle_connections_at_once(
    mock_clock: trio.testing.MockClock, parser: hypercorn_server.Parser
) -> None:
    """A graceful shutdown closes an idle connection at once, and one with a request in
    flight once its response is out."""
    mock_clock.autojump_threshold = 0.1
    shutdown = trio.Event()
    with trio.fail_after(CAP * 100):
        async with trio.open_nursery() as nursery:
            port = await _serve_until(nursery, _slow_app, parser, shutdown)
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            _hypercorn(b" 200 " in await _request(idle, "/"), "no answer")
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            await trio.sleep(1)
            shutdown.set()
            started = trio.current_time()
            _hypercorn(await _closed(idle), "the idle connection was not closed")
            _hypercorn(trio.current_time() - started < 1, "the idle connection lingered")
            answer = await busy.receive_some()
            _hypercorn(b" 200 " in answer, f"the request in flight got {answer!r}")
            _hypercorn(await _closed(busy), "the connection was not closed after its response")
            await idle.aclose()
            await busy.aclose()
            _hypercorn(trio.current_time() - started < 61, "the busy connection lingered")


@PARSERS
async def test_hypercorn_seam_a_closed_websocket_leaves_no_timer_behind(
    mock_clock: trio.testing.MockClock, parser: hypercorn_server.Parser
) -> None:
    """A WebSocket never turns idle, so the keep-alive timer parks for its life; once its
    peer has gone, the connection's tasks end with it. Were the timer left parked, a
    graceful shutdown would wait ``graceful_timeout`` for it (a SIGTERM ignored for 5 s),
    and under a MockClock that never moves, ``wait_all_tasks_blocked`` would never
    return with the server still running."""
    mock_clock.autojump_threshold = 0.1
    shutdown = trio.Event()
    with trio.fail_after(CAP * 100):
        async with trio.open_nursery() as nursery:
            port = await _serve_until(nursery, _app, parser, shutdown)
            for _ in range(2):
                socket = await trio.open_tcp_stream("127.0.0.1", port)
                async with socket:
                    await socket.send_all(_UPGRADE)
                    answer = await socket.receive_some()
                    _hypercorn(answer.startswith(b"HTTP/1.1 101 "), f"answered {answer[:40]!r}")
            await trio.sleep(1)  # mock time: the server reads both goodbyes
            shutdown.set()
            started = trio.current_time()
        stopped = trio.current_time() - started
    _hypercorn(stopped < 1, f"shutting down took {stopped:.0f} s after two closed WebSockets")


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
