"""The composition root: assemble and run one atrium API process (``python run.py serve``).

The process is one supervision tree (docs/ARCHITECTURE.md)::

    root (rest_for_one)
    ├── postgres        supervisor (one_for_one), only without DATABASE_URL
    │   └── postmaster  the embedded PostgreSQL under its guard; restarted when it dies
    ├── database        asyncpg pool (migrations applied first) and the Services built on it
    ├── event_retention prunes the event log at start and every 10 min (unless keep-all)
    ├── http            hypercorn + the QuartTrio app (REST and /ws/ on the main port)
    ├── ws_listener     the dedicated WebSocket listener (wsproto) on WS_PORT (when configured)
    ├── jobs            supervisor: WORKER_CONCURRENCY job actors, the lease reaper, the
    │                   NOTIFY listener and job retention (absent when WORKER_CONCURRENCY=0)
    ├── workspaces      supervisor: one WorkspaceActor per open project (dynamic, transient)
    ├── documents       supervisor: one DocumentActor per open live document (dynamic,
    │                   transient); beside it, the task logging their coalesced edits
    ├── metrics         the Prometheus listener on METRICS_PORT (unless ENABLE_METRICS=false)
    ├── cluster         with REDIS_URL: the presence heartbeat and reaper, and the session
    │                   revocation listener (``atrium.realtime.cluster``); a Redis or
    │                   database outage is waited out inside it
    └── bridge          with REDIS_URL: relays workspace traffic to and from other processes
                        (Redis pub/sub); a Redis outage is waited out inside it

``rest_for_one``: a child's restart restarts every child below it, in this order (the one
list is ``_serving_children``; tests/test_root_order.py restarts each child and checks).
``jobs`` sits above ``workspaces`` so that a workspace crash loop (it closes every
WebSocket; clients resume) never releases running jobs; a ``jobs`` restart restarts the
workspaces. ``metrics``, ``cluster`` and ``bridge`` restart with anything above them,
which costs them a reconnect.

``run.py worker`` runs the same tree without http, ws_listener and workspaces (its bridge
only publishes: job events and progress).
The process's ``Metrics``, its Redis client and its ``Bridge`` are made here, once: they
outlive a restarted child (the ``bridge`` child runs the bridge's connection loops).

Children start in that order and stop in reverse, after the process drained (``/ready``
answers 503 for DRAIN_SECONDS while everything still serves): workspaces close their
WebSockets with 1001, then held jobs are released, then the listeners drain, then the
pool closes, then PostgreSQL stops.
A new pool restarts everything that holds the old one. The postmaster
sits one level down, under a ``one_for_one`` supervisor of its own: its crash restarts it
alone, and the pool (whose URL does not change) reconnects by itself, so a database crash
never restarts the HTTP server. Only a postmaster that keeps dying (more than 10 restarts
in 60 s) escalates to the root.

Wiring: the ``database`` child opens the pool and reports the ``Services`` built on it
(``build_services``: the application services, the workspace registry, ``Realtime``).
Every later child is handed the typed handle of that child (``ChildHandle[Services]``)
and reads its current value when it starts, so a new pool (the child restarted, which
restarts everything after it) means fresh objects everywhere, and nothing is looked up
by name or assigned after construction.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig

from ..actors.bridge import Bridge
from ..core.breaker import BreakerSettings
from ..core.config import Settings
from ..core.failures import ContainedFailures
from ..core.metrics import Metrics
from ..domain.document_sessions import DOCUMENT_FRAMING
from ..domain.services import Services, build_services
from ..http import server as http_server
from ..http.app import create_asgi
from ..http.reuseport import reuse_port_socket
from ..http.ws_listener import serve_listener
from ..jobs import jobs_spec
from ..persistence.database import open_database
from ..persistence.embedded import EmbeddedPostgres
from ..persistence.migrate import migrate
from ..persistence.redis import open_redis
from ..persistence.retention import RetentionPolicy
from ..supervision import Backoff, ChildHandle, ChildSpec, Strategy, Supervisor, open_supervisor
from ..supervision import supervisor_spec as make_supervisor_spec
from .metrics_server import LiveState, serve_metrics
from .retention import EventPruner, retention_policy

log = logging.getLogger("atrium")


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a started server listens, its supervision tree, and the handle of the
    ``database`` child, whose value is the current ``Services`` (for operators and tests)."""

    host: str
    port: int
    ws_port: int | None = None
    metrics_port: int | None = None
    supervisor: Supervisor | None = field(default=None, compare=False)
    services: ChildHandle[Services] | None = field(default=None, compare=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(slots=True)
class HttpServer:
    """The running HTTP child: ``request_stop`` starts hypercorn's graceful shutdown."""

    host: str
    port: int
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
    # A live document's update may be larger than a workspace frame: the transport allows
    # the larger, and each session enforces its own (WS_MAX_MESSAGE_BYTES in Realtime).
    config.websocket_max_message_size = max(
        settings.ws_max_message_bytes, settings.doc_max_update_bytes + DOCUMENT_FRAMING
    )
    return config


async def _run_database(
    settings: Settings,
    url: str,
    clock: Callable[[], float],
    failures: ContainedFailures,
    root: Supervisor,
    metrics: Metrics,
    *,
    draining: trio.Event | None = None,
    bridge: Bridge | None = None,
    task_status: trio.TaskStatus[Services],
) -> None:
    async with open_database(
        url, pool_size=settings.db_pool_size, observe=metrics.observe_query
    ) as db:
        applied = await migrate(db)
        if applied:
            log.info("applied migrations %s", applied)
        services = build_services(
            settings,
            db,
            clock=clock,
            failures=failures,
            supervisor=root,
            draining=draining,
            metrics=metrics,
            bridge=bridge,
        )
        task_status.started(services)
        await trio.sleep_forever()


async def _run_http(
    database: ChildHandle[Services],
    settings: Settings,
    *,
    task_status: trio.TaskStatus[HttpServer],
) -> None:
    app = create_asgi(database.value)
    stop = trio.Event()
    config = hypercorn_config(settings, settings.port)
    if settings.reuse_port:
        # A --workers process: hypercorn listens on a socket that shares the port.
        config.bind = [f"fd://{reuse_port_socket(settings.host, settings.port).detach()}"]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                http_server.serve,
                app,
                config,
                parser=settings.http_parser,
                shutdown_trigger=stop.wait,
            )
        )
        host, _, port = binds[0].removeprefix("http://").rpartition(":")
        task_status.started(HttpServer(host.strip("[]"), int(port), stop))


@dataclass(slots=True)
class WsListener:
    """The running WebSocket listener: ``request_stop`` lets its connections close first."""

    port: int
    stop: trio.Event

    def request_stop(self) -> None:
        self.stop.set()


async def _run_ws_listener(
    database: ChildHandle[Services],
    settings: Settings,
    port: int,
    *,
    task_status: trio.TaskStatus[WsListener],
) -> None:
    realtime = database.value.realtime
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(
                serve_listener,
                realtime,
                settings.host,
                port,
                max_message_size=settings.ws_max_message_bytes,
                documents=database.value.document_sessions,
                document_max_message_size=settings.doc_max_update_bytes + DOCUMENT_FRAMING,
                reuse_port=settings.reuse_port,
            )
        )
        task_status.started(WsListener(bound, stop))
        await stop.wait()
        # The workspaces (stopped before us) have asked every connection to close.
        with trio.move_on_after(5.0):
            await realtime.wait_drained()
        nursery.cancel_scope.cancel()


def _run_workspaces(
    database: ChildHandle[Services], *, task_status: trio.TaskStatus[Supervisor]
) -> Awaitable[None]:
    return database.value.workspaces.run(task_status=task_status)


async def _run_documents(
    database: ChildHandle[Services], *, task_status: trio.TaskStatus[Supervisor]
) -> None:
    """The documents supervisor, and beside it the task that logs their edits as
    coalesced DOCUMENT_EDITED events (``domain.document_activity``)."""
    services = database.value
    async with trio.open_nursery() as nursery:
        nursery.start_soon(services.document_activity.run)
        supervisor: Supervisor = await nursery.start(services.documents.run)
        task_status.started(supervisor)


def _run_jobs(
    database: ChildHandle[Services], *, task_status: trio.TaskStatus[Supervisor]
) -> Awaitable[object]:
    # The spec is built from the current pool's queue each time the subtree starts.
    return jobs_spec(database.value.jobs.queue).factory(task_status=task_status)


def _jobs_child(database: ChildHandle[Services]) -> ChildSpec[Supervisor]:
    return ChildSpec(
        "jobs", partial(_run_jobs, database), shutdown_timeout=math.inf, kind="supervisor"
    )


def _watch(metrics: Metrics, root: Supervisor, database: ChildHandle[Services]) -> None:
    """Read the tree, the pool and the job queue into ``metrics`` when it is scraped."""

    def pool() -> tuple[int, int] | None:
        services = database.value
        return None if services is None else services.db.pool_statistics()

    async def sample_jobs() -> None:
        counts = await database.value.jobs.counts()
        metrics.set_job_counts(
            {str(state): n for state, n in counts.by_state.items()}, counts.completed_recent
        )

    async def count_sent_frames() -> None:
        database.value.realtime.count_sent_frames()

    metrics.watch(LiveState(lambda: root, pool))
    metrics.add_sampler(count_sent_frames)
    metrics.add_sampler(sample_jobs)


async def _run_metrics(
    metrics: Metrics, settings: Settings, *, task_status: trio.TaskStatus[int]
) -> None:
    await serve_metrics(metrics, settings.host, settings.metrics_port, task_status=task_status)


def _serving_children(
    settings: Settings,
    database: ChildHandle[Services],
    bridge: Bridge | None,
    metrics: Metrics,
    clock: Callable[[], float],
) -> list[ChildSpec[Any]]:
    """The root's children after ``database`` in a serving process, in start order: the
    one list of the tree's order (the module docstring draws it; a test restarts each).

    Under ``rest_for_one`` a child's restart restarts every child after it, and children
    stop in reverse. So: the pruner right after the pool it prunes; the listeners next
    (their restarts drop connections, and nothing before them needs them); then ``jobs``
    before ``workspaces``, so a crash loop of the workspaces (a restart of that subtree
    closes every WebSocket, which clients resume) leaves running jobs alone rather than
    releasing and retrying them (a restart of ``jobs`` restarts the workspaces). At
    shutdown the workspaces close their WebSockets (1001) before the listeners drain, and
    jobs are released while the pool is still open. ``metrics``, ``cluster`` and
    ``bridge`` come last: restarting them costs a reconnect and nothing else; the bridge
    follows the workspaces, whose registry it receives for.
    """
    children: list[ChildSpec[Any]] = []
    policy = retention_policy(settings)
    if not policy.keeps_everything:
        children.append(ChildSpec("event_retention", partial(_run_pruner, database, policy, clock)))
    children.append(
        ChildSpec("http", partial(_run_http, database, settings), shutdown_timeout=15.0)
    )
    if settings.ws_port is not None:
        children.append(
            ChildSpec(
                "ws_listener", partial(_run_ws_listener, database, settings, settings.ws_port)
            )
        )
    if settings.worker_concurrency > 0:
        children.append(_jobs_child(database))
    # Its supervisor (one_for_one) allows 5 restarts of its actors in 30 s: with backoff,
    # a crash loop still escalates within 30 s, and restarts the children after it.
    children.append(
        ChildSpec(
            "workspaces",
            partial(_run_workspaces, database),
            shutdown_timeout=math.inf,
            kind="supervisor",
        )
    )
    # Beside the workspaces, after them: a crash loop of the documents closes document
    # sockets only (their providers reconnect), and stopping first at shutdown lets
    # each open document compact while the pool is still open.
    children.append(
        ChildSpec(
            "documents",
            partial(_run_documents, database),
            shutdown_timeout=math.inf,
            kind="supervisor",
        )
    )
    children += _tail_children(settings, database, bridge, metrics)
    return children


def _worker_children(
    settings: Settings,
    database: ChildHandle[Services],
    bridge: Bridge | None,
    metrics: Metrics,
) -> list[ChildSpec[Any]]:
    """The root's children after ``database`` in a job worker (``run.py worker``), in
    start order: the ``jobs`` subtree, then the same tail as a serving process."""
    return [_jobs_child(database), *_tail_children(settings, None, bridge, metrics)]


def _tail_children(
    settings: Settings,
    database: ChildHandle[Services] | None,
    bridge: Bridge | None,
    metrics: Metrics,
) -> list[ChildSpec[Any]]:
    """``metrics`` (with ENABLE_METRICS), then with Redis ``cluster`` (serving processes
    only) and ``bridge``: last, as restarting them restarts nothing else."""
    children: list[ChildSpec[Any]] = []
    if settings.enable_metrics:
        children.append(
            ChildSpec("metrics", partial(_run_metrics, metrics, settings), shutdown_timeout=2.0)
        )
    if bridge is not None:
        if database is not None:
            children.append(
                ChildSpec("cluster", partial(_run_cluster, database), shutdown_timeout=2.0)
            )
        children.append(_bridge_child(bridge, database))
    return children


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
    database: ChildHandle[Services],
    policy: RetentionPolicy,
    clock: Callable[[], float],
    *,
    task_status: trio.TaskStatus[EventPruner],
) -> None:
    await EventPruner(database.value.db, policy, clock=clock).run(task_status=task_status)


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
    When ``shutdown_trigger`` returns, the process drains: ``/ready`` answers 503 at once
    and everything keeps serving for ``settings.drain_seconds``; then the children stop
    in reverse order: held jobs are released, WebSockets close (1001
    ``server_shutdown``), in-flight requests finish, the pool closes, PostgreSQL stops.
    ``clock`` (wall-clock seconds) drives rate-limit windows and cache expiry.
    """
    # One count, one drain flag and one set of metrics for the process: they outlive a
    # restarted child.
    failures = ContainedFailures()
    draining = trio.Event()
    metrics = Metrics()
    with metrics.timing_gc():
        async with (
            _open_bridge(settings, metrics) as bridge,
            _open_root(
                settings, database_url, clock, failures, metrics, draining=draining, bridge=bridge
            ) as (root, database),
        ):
            _watch(metrics, root, database)
            for spec in _serving_children(settings, database, bridge, metrics, clock):
                await root.start_child(spec)
            server: HttpServer = root.child("http").value
            ws_port = root.child("ws_listener").value.port if settings.ws_port is not None else None
            metrics_port = root.child("metrics").value if settings.enable_metrics else None
            task_status.started(
                Bound(server.host, server.port, ws_port, metrics_port, root, database)
            )
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            await _drain(draining, settings.drain_seconds)


@asynccontextmanager
async def _open_root(
    settings: Settings,
    database_url: str | None,
    clock: Callable[[], float],
    failures: ContainedFailures,
    metrics: Metrics,
    *,
    draining: trio.Event | None = None,
    bridge: Bridge | None = None,
) -> AsyncIterator[tuple[Supervisor, ChildHandle[Services]]]:
    """What every process's tree begins with: the root supervisor (rest_for_one), with
    the embedded PostgreSQL's ``postgres`` subtree when ``database_url`` is None, and the
    ``database`` child whose value is the process's ``Services``. The embedded cluster is
    prepared before the tree and closed after it."""
    cluster: EmbeddedPostgres | None = None
    if database_url is None:
        cluster = EmbeddedPostgres(settings.data_dir)
        await trio.to_thread.run_sync(cluster.prepare)
        database_url = cluster.url
    try:
        async with open_supervisor(
            name="root", strategy=Strategy.REST_FOR_ONE, max_restarts=5, period=60.0
        ) as root:
            if cluster is not None:
                await root.start_child(postgres_spec(cluster))
            database = await root.start_child(
                ChildSpec(
                    "database",
                    partial(
                        _run_database,
                        settings,
                        database_url,
                        clock,
                        failures,
                        root,
                        metrics,
                        draining=draining,
                        bridge=bridge,
                    ),
                    shutdown_timeout=15.0,
                )
            )
            yield root, database
    finally:
        if cluster is not None:
            cluster.close()


def breaker_settings(settings: Settings) -> BreakerSettings:
    """The Redis circuit breaker's thresholds (REDIS_BREAKER_*)."""
    return BreakerSettings(
        failures=settings.redis_breaker_failures,
        reset_seconds=settings.redis_breaker_reset_seconds,
        successes=settings.redis_breaker_successes,
    )


@asynccontextmanager
async def _open_bridge(settings: Settings, metrics: Metrics) -> AsyncIterator[Bridge | None]:
    """With REDIS_URL (or REDIS_SENTINELS): the process's Redis client and its ``Bridge``
    for the block (Redis need not be up: the process starts degraded). Without: None."""
    if settings.redis is None:
        yield None
        return
    async with open_redis(settings.redis, breaker_settings(settings)) as redis:
        yield Bridge(redis, metrics, poll_seconds=settings.degraded_poll_seconds)


async def _run_bridge(
    bridge: Bridge,
    database: ChildHandle[Services] | None,
    *,
    task_status: trio.TaskStatus[Bridge],
) -> None:
    if database is None:
        await bridge.run(None, task_status=task_status)
        return
    services = database.value
    await bridge.run(services.workspaces, documents=services.documents, task_status=task_status)


def _bridge_child(bridge: Bridge, database: ChildHandle[Services] | None) -> ChildSpec[Bridge]:
    """The ``bridge`` child: publishes what this process relays and, given the
    ``database`` child (a serving process), receives for the workspaces and live
    documents open here."""
    return ChildSpec("bridge", partial(_run_bridge, bridge, database), shutdown_timeout=2.0)


async def _run_cluster(
    database: ChildHandle[Services], *, task_status: trio.TaskStatus[object]
) -> None:
    cluster = database.value.cluster
    assert cluster is not None  # started only with Redis
    await cluster.run(task_status=task_status)


async def _drain(draining: trio.Event, seconds: float) -> None:
    """Fail readiness at once, then keep serving for ``seconds``: a load balancer that
    polls ``/ready`` stops routing here before the servers stop."""
    draining.set()
    if seconds > 0:
        log.info("draining: /ready answers 503; stopping in %g s", seconds)
        await trio.sleep(seconds)


async def serve_worker(
    settings: Settings,
    database_url: str | None,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a job worker (``run.py worker``): the database and the ``jobs`` subtree, no HTTP
    and no WebSockets. Otherwise like :func:`serve`; ``Bound`` has port 0."""
    metrics = Metrics()
    with metrics.timing_gc():
        async with (
            _open_bridge(settings, metrics) as bridge,
            _open_root(
                settings, database_url, clock, ContainedFailures(), metrics, bridge=bridge
            ) as (
                root,
                database,
            ),
        ):
            _watch(metrics, root, database)
            for spec in _worker_children(settings, database, bridge, metrics):
                await root.start_child(spec)
            metrics_port = root.child("metrics").value if settings.enable_metrics else None
            task_status.started(Bound(settings.host, 0, None, metrics_port, root, database))
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
