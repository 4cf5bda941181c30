"""Assemble and run one atrium API process (what ``python run.py serve`` runs).

The process is one supervision tree (docs/ARCHITECTURE.md)::

    root (rest_for_one)
    ├── postgres        supervisor (one_for_one), only without DATABASE_URL
    │   └── postmaster  the embedded PostgreSQL under its guard; restarted when it dies
    ├── database        asyncpg pool; migrations applied before it reports started
    ├── event_retention prunes the event log at start and every 10 min (unless keep-all)
    ├── http            hypercorn + the QuartTrio app (REST and /ws/ on the main port)
    ├── ws_listener     trio-websocket on WS_PORT (when configured)
    └── workspaces      supervisor: one WorkspaceActor per open project (dynamic, transient)

Children start in that order and stop in reverse: workspaces close their WebSockets with
1001 first, then the listeners drain, then the pool closes, then PostgreSQL stops.
``rest_for_one``: a new pool restarts everything that holds the old one. The postmaster
sits one level down, under a ``one_for_one`` supervisor of its own: its crash restarts it
alone, and the pool (whose URL does not change) reconnects by itself, so a database crash
never restarts the HTTP server. Only a postmaster that keeps dying (more than 10 restarts
in 60 s) escalates to the root.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig

from .actors.workspace import Workspaces, WorkspaceSettings
from .config import Settings
from .failures import ContainedFailures
from .http import server as http_server
from .http.app import create_asgi
from .http.ws_listener import serve_listener
from .persistence.database import Database, open_database
from .persistence.embedded import EmbeddedPostgres
from .persistence.migrate import migrate
from .persistence.retention import RetentionPolicy
from .retention import EventPruner, retention_policy
from .services import build_services
from .realtime import Realtime, SessionSettings
from .supervision import Backoff, ChildSpec, Strategy, Supervisor, open_supervisor
from .supervision import supervisor_spec as make_supervisor_spec

log = logging.getLogger("atrium")


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a started server listens, and its supervision tree (for operators and tests)."""

    host: str
    port: int
    ws_port: int | None = None
    supervisor: Supervisor | None = field(default=None, compare=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(slots=True)
class HttpServer:
    """The running HTTP child: ``request_stop`` starts hypercorn's graceful shutdown."""

    host: str
    port: int
    realtime: Realtime
    stop: trio.Event

    def request_stop(self) -> None:
        self.stop.set()


def tune_gc() -> None:
    """Freeze the start-up heap and collect less often.

    Cyclic GC walking long-lived objects costs the request path up to half its throughput
    (DESIGN.md); frozen objects are never scanned again. But a closed connection's objects
    are cyclic garbage in the oldest generation (a connection lives long enough to be
    promoted there), so full collections must still come: with a third threshold of 100
    they came about every 250 million allocations and memory grew with connection churn
    (``bench/ws_fanout.py --scenario churn``); at 5 it levels off, at no measurable cost.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 5)


def hypercorn_config(settings: Settings, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{port}"]
    config.graceful_timeout = 10.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.websocket_max_message_size = settings.ws_max_message_bytes
    return config


def session_settings(settings: Settings) -> SessionSettings:
    return SessionSettings(
        auth_timeout=settings.ws_auth_timeout_seconds,
        heartbeat_interval=settings.ws_heartbeat_interval_seconds,
        heartbeat_timeout=settings.ws_heartbeat_timeout_seconds,
        send_queue=settings.ws_send_queue,
        rate_per_second=settings.ws_rate_limit_per_second,
        rate_burst=2 * settings.ws_rate_limit_per_second,
        max_connections_per_user=settings.ws_max_connections_per_user,
        user_edits_per_second=settings.ws_user_edits_per_second,
        user_edit_burst=2 * settings.ws_user_edits_per_second,
    )


async def _run_database(
    settings: Settings, url: str, *, task_status: trio.TaskStatus[Database]
) -> None:
    async with open_database(url, pool_size=settings.db_pool_size) as db:
        applied = await migrate(db)
        if applied:
            log.info("applied migrations %s", applied)
        task_status.started(db)
        await trio.sleep_forever()


async def _run_http(
    root: Supervisor,
    settings: Settings,
    clock: Callable[[], float],
    workspaces_spec: ChildSpec[Supervisor],
    failures: ContainedFailures,
    *,
    task_status: trio.TaskStatus[HttpServer],
) -> None:
    db: Database = root.child("database").value
    workspaces = Workspaces(
        root,
        workspaces_spec,
        db,
        WorkspaceSettings(
            resume_max_events=settings.resume_max_events,
            idle_timeout=settings.workspace_idle_seconds,
            # A batch of edits reaches every outbox at once: keep it well inside a
            # connection's queue, so a burst is never taken for a slow consumer.
            edit_batch=max(1, min(64, settings.ws_send_queue // 8)),
        ),
    )
    services = build_services(settings, db, clock=clock)
    services.failures = failures
    realtime = Realtime(
        db=db,
        tokens=services.tokens,
        workspaces=workspaces,
        allowed_origins=settings.allowed_origins,
        settings=session_settings(settings),
        failures=failures,
    )
    services.publish = workspaces
    services.realtime = realtime
    services.revoke_live_session = realtime.revoke_session
    services.supervisor = root
    app = create_asgi(services)
    stop = trio.Event()
    config = hypercorn_config(settings, settings.port)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(http_server.serve, app, config, shutdown_trigger=stop.wait)
        )
        host, _, port = binds[0].removeprefix("http://").rpartition(":")
        task_status.started(HttpServer(host.strip("[]"), int(port), realtime, stop))


@dataclass(slots=True)
class WsListener:
    """The running WebSocket listener: ``request_stop`` lets its sessions close first."""

    port: int
    stop: trio.Event

    def request_stop(self) -> None:
        self.stop.set()


async def _run_ws_listener(
    root: Supervisor, settings: Settings, port: int, *, task_status: trio.TaskStatus[WsListener]
) -> None:
    http: HttpServer = root.child("http").value
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(
                serve_listener,
                http.realtime,
                settings.host,
                port,
                max_message_size=settings.ws_max_message_bytes,
            )
        )
        task_status.started(WsListener(bound, stop))
        await stop.wait()
        # The workspaces (stopped before us) have asked every session to close.
        with trio.move_on_after(5.0):
            await http.realtime.wait_drained()
        nursery.cancel_scope.cancel()


def postgres_spec(cluster: EmbeddedPostgres) -> ChildSpec[Supervisor]:
    """The ``postgres`` subtree: the embedded postmaster, restarted (after 0.5-5 s) when it
    dies, on the same data directory and socket."""
    return make_supervisor_spec(
        "postgres",
        ChildSpec("postmaster", cluster.run, shutdown_timeout=60.0),
        strategy=Strategy.ONE_FOR_ONE,
        max_restarts=10,
        period=60.0,
        backoff=Backoff(base=0.5, maximum=5.0),
    )


async def _run_pruner(
    root: Supervisor,
    policy: RetentionPolicy,
    clock: Callable[[], float],
    *,
    task_status: trio.TaskStatus[EventPruner],
) -> None:
    db: Database = root.child("database").value
    await EventPruner(db, policy, clock=clock).run(task_status=task_status)


async def serve(
    settings: Settings,
    database_url: str | None,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the supervision tree until cancelled or ``shutdown_trigger`` returns.

    With ``database_url`` None, an embedded PostgreSQL in ``settings.data_dir`` runs as the
    tree's first child. Must run inside the process's ``trio_asyncio`` loop. Calls
    ``task_status.started(Bound)`` once the ports are listening (port 0 picks a free one).
    Shutdown stops the children in reverse order: WebSockets close (1001), in-flight
    requests finish, the pool closes, PostgreSQL stops.
    ``clock`` (wall-clock seconds) drives rate-limit windows and cache expiry.
    """
    # Backoff delays count against the period: 5 restarts of one workspace take 3.1 s of
    # backoff, so a crash loop still escalates within 30 s.
    workspaces_spec = make_supervisor_spec(
        "workspaces", strategy=Strategy.ONE_FOR_ONE, max_restarts=5, period=30.0
    )
    cluster: EmbeddedPostgres | None = None
    if database_url is None:
        cluster = EmbeddedPostgres(settings.data_dir)
        await trio.to_thread.run_sync(cluster.prepare)
        database_url = cluster.url
    try:
        await _serve_tree(
            settings, database_url, cluster, workspaces_spec, shutdown_trigger, clock, task_status
        )
    finally:
        if cluster is not None:
            cluster.close()


async def _serve_tree(
    settings: Settings,
    database_url: str,
    cluster: EmbeddedPostgres | None,
    workspaces_spec: ChildSpec[Supervisor],
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    clock: Callable[[], float],
    task_status: trio.TaskStatus[Bound],
) -> None:
    # One count for the process: it outlives a restarted HTTP child.
    failures = ContainedFailures()
    async with open_supervisor(
        name="root", strategy=Strategy.REST_FOR_ONE, max_restarts=5, period=60.0
    ) as root:
        if cluster is not None:
            await root.start_child(postgres_spec(cluster))
        await root.start_child(
            ChildSpec(
                "database", partial(_run_database, settings, database_url), shutdown_timeout=15.0
            )
        )
        # After the pool it prunes, before the servers: their restarts leave it alone.
        policy = retention_policy(settings)
        if not policy.keeps_everything:
            await root.start_child(
                ChildSpec("event_retention", partial(_run_pruner, root, policy, clock))
            )
        http = await root.start_child(
            ChildSpec(
                "http",
                partial(_run_http, root, settings, clock, workspaces_spec, failures),
                shutdown_timeout=15.0,
            )
        )
        ws_port = None
        if settings.ws_port is not None:
            listener = await root.start_child(
                ChildSpec(
                    "ws_listener", partial(_run_ws_listener, root, settings, settings.ws_port)
                )
            )
            ws_port = listener.value.port
        await root.start_child(workspaces_spec)
        server: HttpServer = http.value
        task_status.started(Bound(server.host, server.port, ws_port, root))
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
