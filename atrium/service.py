"""Assemble and run one atrium API process (what ``python run.py serve`` runs)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .config import Settings
from .http.app import create_app
from .persistence.database import open_database
from .persistence.migrations import migrate
from .services import build_services

log = logging.getLogger("atrium")


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a started server listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def tune_gc() -> None:
    """Freeze the start-up heap and collect less often.

    Cyclic GC walking long-lived objects costs the request path up to half its throughput
    (DESIGN.md); frozen objects are never scanned again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def hypercorn_config(settings: Settings, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{port}"]
    config.graceful_timeout = 10.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def serve(
    settings: Settings,
    database_url: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Migrate, then serve the API until cancelled or ``shutdown_trigger`` returns.

    Must run inside the process's ``trio_asyncio`` loop. Calls ``task_status.started(Bound)``
    once the port is listening (port 0 picks a free one). Shutdown lets in-flight requests
    finish, then closes the pool. ``clock`` (wall-clock seconds) drives rate-limit windows.
    """
    async with open_database(database_url, pool_size=settings.db_pool_size) as db:
        applied = await migrate(db)
        if applied:
            log.info("applied migrations %s", applied)
        app = create_app(build_services(settings, db, clock=clock))
        config = hypercorn_config(settings, settings.port)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: hypercorn_serve(
                    app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
            )
            host, _, port = binds[0].removeprefix("http://").rpartition(":")
            task_status.started(Bound(host.strip("[]"), int(port)))
