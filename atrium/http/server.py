"""hypercorn's trio server for atrium's app, every TCP connection inside its own failure
boundary.

hypercorn runs each accepted connection as a task in the server's nursery, so an
exception its protocol code lets out of one connection would end the whole server, REST
included (a stranger can cause one: see ``atrium.seams.hypercorn_server``). ``serve`` runs
the seam's contained server: that connection ends, the failure is logged once and counted
in the Edge layer's ``ContainedFailures`` (``app.failures``), and the server goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config

from ..core.failures import ContainedFailures
from ..seams import hypercorn_server
from .request_log import RequestLog

_UNATTRIBUTED = ContainedFailures()  # for an app without ``failures`` (never in atrium)


async def serve(
    app: RequestLog,
    config: Config,
    *,
    parser: hypercorn_server.Parser = "h11",
    shutdown_trigger: Callable[..., Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` for ``app``, each connection contained (see above), parsing
    HTTP/1.1 with ``parser`` (``HTTP_PARSER``)."""

    def contain(group: BaseException) -> None:
        failures = getattr(app, "failures", None)
        if not isinstance(failures, ContainedFailures):
            failures = _UNATTRIBUTED
        failures.record("connection", group, {"transport": "http"})

    await hypercorn_server.serve(
        app,
        config,
        contain=contain,
        parser=parser,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
