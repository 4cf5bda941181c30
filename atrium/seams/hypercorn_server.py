"""hypercorn's trio server, with every TCP connection inside its own failure boundary.

Written against hypercorn 0.18.0 (``hypercorn/trio/run.py``, ``hypercorn/trio/tcp_server.py``).

Why: hypercorn runs each accepted connection as a task in the server's nursery, so an
exception its protocol code lets out of one connection ends the whole server. One that a
stranger can cause: a WebSocket upgrade request with frame bytes pipelined behind it,
before the 101 (h11 raises ``LocalProtocolError`` answering it). ``ContainedTCPServer``
catches what a connection lets out and hands it to a ``contain`` callback: that
connection ends (its socket is already closed by then) and the server goes on.

How, and why not a hook: hypercorn's ``worker_serve`` builds its ``TCPServer`` by the name
it imported, and neither it nor ``hypercorn.trio.serve`` takes a server class or a
per-connection hook (nor does ``Config``). Replacing ``hypercorn.trio.run.TCPServer`` would
patch every hypercorn server in the process at import; wrapping the ASGI app cannot help
(the failure is in hypercorn's protocol code, outside the app). So this module owns
:func:`worker_serve`, a copy of hypercorn 0.18.0's ``worker_serve`` (lifespan, sockets,
TLS, QUIC, graceful shutdown unchanged) whose one difference is the server class it builds,
and :func:`serve`, the copy of ``hypercorn.trio.serve`` that calls it.

Relies on (checked by tests/test_seams.py): ``TCPServer(app, config, context, state,
stream)`` with an ``async run()`` and its ``app`` attribute; ``Lifespan(app, config,
state)`` with ``handle_lifespan``, ``wait_for_startup``, ``wait_for_shutdown``;
``WorkerContext(max_requests)`` with ``terminate``/``terminated``; ``UDPServer``;
``ConnectionState``; ``StatsdLogger``; ``hypercorn.utils``' ``raise_shutdown``,
``repr_socket_addr``, ``ShutdownError``, ``wrap_app``; ``Config.create_sockets``,
``create_ssl_context``, ``set_statsd_logger_class``; ``H11Protocol``'s ``stream_send`` and
``_send_h11_event(event)``, ``_send_error_response(status_code)`` (its answer to a request
h11 refuses) and ``_check_protocol(event)`` (its switch to HTTP/2).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from itertools import chain
from math import inf
from random import randint
from time import time
from typing import Any, Literal, Self

import h11
import h11._headers
import hypercorn.protocol
import hypercorn.protocol.h11
import hypercorn.trio.task_group
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.udp_server import UDPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveEvent,
    ASGISendEvent,
    ConnectionState,
    Framework,
    H11SendableEvent,
    LifespanState,
    Scope,
)
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)

from .llhttp_protocol import LlhttpProtocol, check_headers
from .refusals import refusal_body, refusal_headers

# How HTTP/1.1 requests are parsed: hypercorn's h11, or llhttp (``HTTP_PARSER``).
Parser = Literal["h11", "httptools"]

# Told of what one connection let out (an exception group); never raises.
Contain = Callable[[BaseException], None]


class ContainedTCPServer(TCPServer):
    """hypercorn's per-connection server; an Exception ends this connection only.

    Its HTTP/1.1 path is also cheaper per request than hypercorn's (docs/BENCHMARKS.md,
    "The HTTP floor"), each change one that hypercorn could take as it is:

    - the keep-alive timer is one task for the connection's life (:meth:`_keep_alive`,
      cancelled once the connection stops reading), where hypercorn's ``TrioSingleTask``
      starts a task for it after every response and cancels that task at the next
      request (187 against 328 us a request for a bare app, docs/BENCHMARKS.md);
    - a write takes the send lock without a checkpoint when no other write holds it (the
      write itself is the checkpoint), except on a WebSocket: there hypercorn's checkpoint
      before each write costs less a delivery (docs/BENCHMARKS.md, "The main port's
      fan-out, bisected");
    - a read without ``read_timeout`` opens no timeout scope;
    - the protocol is :class:`H11Protocol`'s, writing a response's head with its body,
      and a request's messages reach its app through an :class:`AppInbox`.
    """

    _task_group: TaskGroup  # the connection's (``_run``'s): it knows a WebSocket's

    def __init__(self, contain: Contain, *args: Any, parser: Parser = "h11") -> None:
        super().__init__(*args)
        self._contain = contain
        self._parser = parser
        # The keep-alive timer's state: protocol_send writes it, _keep_alive reads it.
        self._busy = False  # a request is in flight
        self._idle_since = trio.current_time()
        self._parked = False  # _keep_alive waits, without a deadline, for the next idle
        self._keep_alive_scope = trio.CancelScope()
        # Cancelled once the connection stops reading: the timer has nothing left to close.
        self._keep_alive_task_scope = trio.CancelScope()

    async def run(self) -> None:
        try:
            await self._run()
        except* Exception as group:
            self._contain(group)

    async def _run(self) -> None:
        """hypercorn's ``TCPServer.run``, building :class:`ProtocolWrapper` and starting the
        connection's one keep-alive task (tests/test_seams.py compares the two)."""
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # Handshake failed
            alpn_protocol = self.stream.selected_alpn_protocol()
            socket = self.stream.transport_stream.socket
            ssl = True
        except AttributeError:  # Not SSL
            alpn_protocol = "http/1.1"
            socket = self.stream.socket
            ssl = False

        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())

            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = ProtocolWrapper(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol,
                    self._parser,
                )
                await self.protocol.initiate()
                self._task_group.spawn(self._keep_alive)
                await self._read_data()
                self._keep_alive_task_scope.cancel()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if self._task_group.websocket:
                await self.send_lock.acquire()  # hypercorn's: a checkpoint before each write
            else:
                try:
                    self.send_lock.acquire_nowait()
                except trio.WouldBlock:
                    await self.send_lock.acquire()
            try:
                try:
                    with trio.CancelScope() as cancel_scope:
                        cancel_scope.shield = True
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
            finally:
                self.send_lock.release()
        elif isinstance(event, Updated):
            self._busy = not event.idle
            if not self._busy:
                self._idle_since = now = trio.current_time()
                if self._parked:
                    self._parked = False
                    if self.context.terminated.is_set():
                        self._keep_alive_scope.deadline = now
                    else:
                        self._keep_alive_scope.deadline = now + self.config.keep_alive_timeout
        else:
            await super().protocol_send(event)

    async def _read_data(self) -> None:
        read_timeout = self.config.read_timeout
        while True:
            try:
                if read_timeout is None:
                    data = await self.stream.receive_some(MAX_RECV)
                else:
                    with trio.fail_after(read_timeout):
                        data = await self.stream.receive_some(MAX_RECV)
            except (
                trio.ClosedResourceError,
                trio.BrokenResourceError,
                trio.TooSlowError,
            ):
                break
            else:
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        await self.protocol.handle(Closed())

    async def _keep_alive(self) -> None:
        """hypercorn's ``_idle_timeout`` for the connection's life: closes it once idle for
        ``keep_alive_timeout``, or at once when idle after the server began to shut down.

        Requests only flip ``_busy`` and note when the connection went idle; this task
        wakes once a ``keep_alive_timeout`` and goes back to sleep if the connection was
        used meanwhile, or parks while a request is in flight (``protocol_send`` wakes it).
        It ends, closing nothing, once the connection stops reading (``_run`` cancels it):
        a connection that ends busy (a WebSocket, or a request the peer closed its side
        under) never turns idle again, and parked it would keep the connection's task
        group open until the server's graceful timeout cancelled it.
        """
        with self._keep_alive_task_scope:
            await self._wait_idle_too_long()
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()

    async def _wait_idle_too_long(self) -> None:
        timeout = self.config.keep_alive_timeout
        terminated = self.context.terminated
        deadline = trio.current_time() + timeout
        while True:
            with trio.CancelScope(deadline=deadline) as self._keep_alive_scope:
                await terminated.wait()
                if self._busy:  # shutting down: close once the response is out
                    self._parked = True
                    await trio.sleep_forever()
            if self._busy:
                self._parked, deadline = True, inf
                continue
            if terminated.is_set():
                return
            deadline = self._idle_since + timeout
            if deadline <= trio.current_time():
                return


class ProtocolWrapper(hypercorn.protocol.ProtocolWrapper):
    """hypercorn's ``ProtocolWrapper``, speaking HTTP/1.1 with :class:`H11Protocol`, or
    with :class:`LlhttpProtocol` (``parser="httptools"``), which hands upgrades to an
    :class:`H11Protocol`."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        task_group: hypercorn.trio.task_group.TaskGroup,
        state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
        alpn_protocol: str | None = None,
        parser: Parser = "h11",
    ) -> None:
        super().__init__(
            app, config, context, task_group, state, ssl, client, server, send, alpn_protocol
        )
        if alpn_protocol != "h2":
            h11_protocol = partial(
                H11Protocol, app, config, context, task_group, state, ssl, client, server, send
            )
            if parser == "httptools":
                self.protocol = LlhttpProtocol(  # type: ignore[assignment]
                    app,
                    config,
                    context,
                    task_group,
                    state,
                    ssl,
                    client,
                    server,
                    send,
                    h11_protocol,
                    partial(server_headers, config),
                )
            else:
                self.protocol = h11_protocol()


class TaskGroup(hypercorn.trio.task_group.TaskGroup):
    """hypercorn's trio ``TaskGroup``, handing each request's messages to its app through
    an :class:`AppInbox` rather than a memory channel; ``websocket`` tells the connection
    that its app is a WebSocket's (:meth:`ContainedTCPServer.protocol_send` writes those
    as hypercorn does)."""

    websocket = False  # a WebSocket's app was spawned: the connection is one

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        return self

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Scope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        if scope["type"] == "websocket":
            self.websocket = True
        inbox = AppInbox(config.max_app_queue_size)
        assert self._nursery is not None  # spawned from inside ``async with``
        self._nursery.start_soon(
            _handle,
            app,
            config,
            scope,
            inbox.get,
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return inbox.put


class AppInbox:
    """A request's messages to its app (the body, then ``http.disconnect``): a bounded FIFO,
    as hypercorn's memory channel of ``max_app_queue_size``, whose ``put`` and ``get``
    return without a trip through the scheduler when they need not wait. A memory
    channel's two cost a request two such trips, and the pair of channel objects."""

    __slots__ = ("_getters", "_messages", "_putters", "_size")

    def __init__(self, size: int) -> None:
        self._messages: deque[ASGIReceiveEvent] = deque()
        self._size = max(size, 1)  # a channel of 0 hands over; this holds one at least
        self._getters = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

    async def put(self, message: ASGIReceiveEvent) -> None:
        """Queue ``message``; waits while ``size`` are queued."""
        while len(self._messages) >= self._size:
            await self._putters.park()
        self._messages.append(message)
        self._getters.unpark()

    async def get(self) -> ASGIReceiveEvent:
        """The oldest message; waits for one."""
        while not self._messages:
            await self._getters.park()
        self._putters.unpark()
        return self._messages.popleft()


class H11Protocol(hypercorn.protocol.h11.H11Protocol):
    """hypercorn's HTTP/1.1 protocol, writing a response's head with its first body bytes.

    hypercorn writes the head, each body chunk and the end of the body as three writes
    (the last one empty with a ``Content-Length``): two packets and three trips through
    the send lock and the scheduler for the commonest response. ASGI already lets a server
    hold the head until the first body message arrives, and an empty write is skipped.
    Also: the Date and other server headers are built once a second, and each distinct
    header pair is checked once (:func:`validated_response`); a request h11 refuses is
    answered in atrium's JSON error shape (:meth:`_send_error_response`); ``Upgrade: h2c``
    switches protocols only with ``Connection: upgrade`` (:meth:`_check_protocol`).
    """

    _head = b""

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200:
            headers = list(chain(event.headers, self._response_headers()))
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            response = validated_response(headers, event.status_code)
            try:
                self._head += self.connection.send(response)
            except h11.LocalProtocolError:
                if self.connection.their_state != h11.ERROR:
                    raise
        elif isinstance(event, Body | EndBody):
            await super().stream_send(event)
        else:
            await self._flush()
            await super().stream_send(event)

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        head, self._head = self._head, b""
        try:
            data = head + self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            data = head
        if data:
            await self.send(RawData(data=data))

    async def _send_error_response(self, status_code: int) -> None:
        """hypercorn's answer to a request h11 refused (400, 431, 501), with the JSON error
        body :class:`LlhttpProtocol` writes for it (hypercorn's is empty); hypercorn closes
        the connection after it."""
        body = refusal_body(status_code)
        headers = refusal_headers(body) + self._response_headers()
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def _check_protocol(self, event: h11.Request) -> None:
        """hypercorn's switch to HTTP/2 (an h2c upgrade, or ``PRI``), an h2c upgrade taken
        only with the ``upgrade`` connection option (RFC 9110 7.8, RFC 9113 3.1), as llhttp
        takes it: hypercorn switches on ``Upgrade: h2c`` alone, so the same request was
        HTTP/2 on one parser and HTTP/1.1 on the other."""
        if event.method == b"PRI" or _asks_upgrade(event.headers):
            await super()._check_protocol(event)

    def _response_headers(self) -> list[tuple[bytes, bytes]]:
        return server_headers(self.config)

    async def _flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            await self.send(RawData(data=head))


def _asks_upgrade(headers: h11._headers.Headers) -> bool:
    """A request's Connection header carries the ``upgrade`` option (h11 lower-cases
    names)."""
    return any(
        name == b"connection" and b"upgrade" in (t.strip().lower() for t in value.split(b","))
        for name, value in headers
    )


_server_headers: tuple[int, int, list[tuple[bytes, bytes]]] = (-1, 0, [])


def server_headers(config: Config) -> list[tuple[bytes, bytes]]:
    """``config.response_headers("h11")``, built once a second: only its Date changes,
    once a second (hypercorn formats it for every response)."""
    global _server_headers
    second = int(time())
    if _server_headers[0] != second or _server_headers[1] != id(config):
        _server_headers = (second, id(config), config.response_headers("h11"))
    return _server_headers[2]


async def serve(
    app: Framework,
    config: Config,
    *,
    contain: Contain,
    parser: Parser = "h11",
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` (ASGI), each connection contained: ``contain`` is told of
    what one lets out."""
    if config.debug:
        warnings.warn("The config `debug` has no affect when using serve", Warning, 2)
    if config.workers != 1:
        warnings.warn("The config `workers` has no affect when using serve", Warning, 2)
    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, None),
        config,
        contain=contain,
        parser=parser,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


async def worker_serve(
    app: AppWrapper,
    config: Config,
    *,
    contain: Contain,
    parser: Parser = "h11",
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn 0.18.0's ``hypercorn.trio.run.worker_serve``, building
    ``ContainedTCPServer`` (with ``contain`` and ``parser``) where it builds ``TCPServer``."""
    config.set_statsd_logger_class(StatsdLogger)

    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            if sockets is None:
                sockets = config.create_sockets()
                for sock in sockets.secure_sockets:
                    sock.listen(config.backlog)
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)

            ssl_context = config.create_ssl_context()
            listeners: list[trio.SSLListener[trio.SocketStream] | trio.SocketListener] = []
            binds = []
            for sock in sockets.secure_sockets:
                listeners.append(
                    trio.SSLListener(
                        trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                        ssl_context,  # type: ignore[arg-type]  # None only without certfile
                        https_compatible=True,
                    )
                )
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"https://{bind}")
                await config.log.info(f"Running on https://{bind} (CTRL + C to quit)")

            for sock in sockets.insecure_sockets:
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"http://{bind}")
                await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")

            for sock in sockets.quic_sockets:
                await server_nursery.start(
                    UDPServer(
                        app, config, context, ConnectionState(lifespan_state.copy()), sock
                    ).run
                )
                bind = repr_socket_addr(sock.family, sock.getsockname())
                await config.log.info(f"Running on https://{bind} (QUIC) (CTRL + C to quit)")

            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)

                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(
                                ContainedTCPServer,
                                contain,
                                app,
                                config,
                                context,
                                ConnectionState(lifespan_state.copy()),
                                parser=parser,
                            ),
                            listeners,
                            handler_nursery=server_nursery,
                        ),
                    )

                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors  # noqa: B904  # as hypercorn does
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


# Header pairs h11's expressions have passed: a response's headers are mostly the same pairs
# every time (content type, security headers, the Date of this second). Bounded: cleared
# when full, so pairs seen once (request ids) cannot grow it.
def validated_response(headers: list[tuple[bytes, bytes]], status_code: int) -> h11.Response:
    """``h11.Response(headers=headers, status_code=status_code)``, the headers checked by
    :func:`check_headers` (each distinct pair once) rather than by h11 for every response."""
    check_headers(headers)
    return h11.Response(headers=headers, status_code=status_code, _parsed=True)
