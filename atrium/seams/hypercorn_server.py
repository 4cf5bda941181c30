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
``create_ssl_context``, ``set_statsd_logger_class``.
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.udp_server import UDPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, Framework, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

# Told of what one connection let out (an exception group); never raises.
Contain = Callable[[BaseException], None]


class ContainedTCPServer(TCPServer):
    """hypercorn's per-connection server; an Exception ends this connection only."""

    def __init__(self, contain: Contain, *args: Any) -> None:
        super().__init__(*args)
        self._contain = contain

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:
            self._contain(group)


async def serve(
    app: Framework,
    config: Config,
    *,
    contain: Contain,
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
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


async def worker_serve(
    app: AppWrapper,
    config: Config,
    *,
    contain: Contain,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn 0.18.0's ``hypercorn.trio.run.worker_serve``, building
    ``ContainedTCPServer`` (with ``contain``) where it builds ``TCPServer``."""
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
