"""hypercorn's trio server, with every TCP connection inside its own failure boundary.

hypercorn runs each accepted connection as a task in the server's nursery, so an
exception its protocol code lets out of one connection ends the whole server, REST
included. One that a stranger can cause: a WebSocket upgrade request with frame bytes
pipelined behind it, before the 101 (h11 raises ``LocalProtocolError`` answering it).
``serve`` runs hypercorn with a ``TCPServer`` that contains this: that connection ends
(its socket is already closed by then), the failure is logged once and counted in the
Edge layer's ``ContainedFailures`` (``app.failures``), and the server goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer

from ..failures import ContainedFailures
from .request_log import RequestLog


class ContainedTCPServer(TCPServer):
    """hypercorn's per-connection server; an Exception ends this connection only."""

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:
            ours = getattr(self.app, "app", None)  # hypercorn's ASGIWrapper around ours
            failures = getattr(ours, "failures", None)
            if not isinstance(failures, ContainedFailures):
                failures = _UNATTRIBUTED
            failures.record("connection", group, {"transport": "http"})


_UNATTRIBUTED = ContainedFailures()  # for an app without ``failures`` (never in atrium)


# hypercorn's worker looks its TCPServer up by name for each connection it accepts.
hypercorn.trio.run.TCPServer = ContainedTCPServer  # type: ignore[attr-defined]


async def serve(
    app: RequestLog,
    config: Config,
    *,
    shutdown_trigger: Callable[..., Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` for ``app``, each connection contained (see above)."""
    await hypercorn_serve(
        app,
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
