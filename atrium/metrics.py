"""Prometheus metrics of one process: what is counted, and what is read at scrape time.

One ``Metrics`` per process (the composition root makes it; it outlives a restarted
child), each with its own ``CollectorRegistry``: tests run several servers in one
process, and the global default registry would mix their counts (and refuse the second
registration of a name).

Hot paths only increment pre-bound children (no label lookup per event): a broadcast adds
its fan-out once, a query observes one histogram. Gauges of live state (open workspaces,
mailbox depth, pool use, supervisor restarts) are read by ``LiveState`` when scraped, and
the job queue's depth by state is sampled by one query per scrape (``sample``), so
nothing is kept up to date between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .supervision import Supervisor, SupervisorSnapshot

log = logging.getLogger("atrium.metrics")

SAMPLE_TIMEOUT = 2.0
# Requests and queries: 1 ms .. 10 s (the default buckets start at 5 ms, coarse for reads).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TRANSPORTS = ("main", "listener")

Sampler = Callable[[], Awaitable[None]]


class Metrics:
    """The metrics of one process and the registry that serves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.http_requests = Counter(
            "atrium_http_requests",
            "HTTP requests answered by the app, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "atrium_http_request_duration_seconds",
            "Time from a request's arrival at the app to its last response byte",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ws_open = Gauge(
            "atrium_ws_connections_open",
            "WebSocket connections being served, by transport",
            ["transport"],
            registry=r,
        )
        self.ws_open_by_transport = {t: self.ws_open.labels(t) for t in TRANSPORTS}
        self.ws_frames_in = Counter(
            "atrium_ws_frames_in", "WebSocket frames received from clients", registry=r
        )
        self.ws_frames_out = Counter(
            "atrium_ws_frames_out",
            "WebSocket data frames sent to clients (a batch=1 frame counts once)",
            registry=r,
        )
        self.ws_deliveries = Counter(
            "atrium_ws_deliveries",
            "Broadcast messages handed to connections (one per recipient)",
            registry=r,
        )
        self.ws_closes = Counter(
            "atrium_ws_closes",
            "WebSocket connections ended, by the close code the server sent ('peer': the "
            "client closed or went away first)",
            ["code"],
            registry=r,
        )
        self.ws_slow_consumers = Counter(
            "atrium_ws_slow_consumer_closes",
            "Connections closed because their send queue filled (4008)",
            registry=r,
        )
        self.ws_resumes = Counter(
            "atrium_ws_resumes", "Joins that asked to resume (since_seq)", registry=r
        )
        self.ws_replayed = Counter(
            "atrium_ws_resume_replayed_events", "Events replayed to resuming clients", registry=r
        )
        self.db_query_seconds = Histogram(
            "atrium_db_query_duration_seconds",
            "Database round trips (a query, or a whole transaction), from trio",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        cache = Counter(
            "atrium_project_cache_lookups",
            "Project-list cache lookups, by result (hit or miss)",
            ["result"],
            registry=r,
        )
        self.cache_hits = cache.labels("hit")
        self.cache_misses = cache.labels("miss")
        self.job_attempts = Counter(
            "atrium_job_attempts",
            "Job attempts finished in this process, by task and outcome",
            ["task", "outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "atrium_job_run_duration_seconds",
            "Run time of job attempts, by task",
            ["task"],
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge(
            "atrium_jobs",
            "Jobs waiting or running, by state (queued, running, failed: waiting for a "
            "retry), across all processes: read from the database on scrape",
            ["state"],
            registry=r,
        )
        # -- the Redis bridge between processes (atrium.actors.bridge) --
        self.bridge_connected = Gauge(
            "atrium_bridge_connected",
            "1 while the bridge is subscribed to Redis, 0 while degraded (Redis away: this "
            "process serves its own clients alone); a publish-only bridge (run.py worker): 1 "
            "while Redis answers",
            registry=r,
        )
        self.redis_breaker = Gauge(
            "atrium_redis_breaker_state",
            "The Redis circuit breaker's state (1 for the current one)",
            ["state"],
            registry=r,
        )
        self.bridge_published = Counter(
            "atrium_bridge_messages_published",
            "Messages this process published to Redis, by kind (events, ephemeral, catch_up: "
            "the log position of events it could not publish earlier)",
            ["kind"],
            registry=r,
        )
        self.bridge_received = Counter(
            "atrium_bridge_messages_received",
            "Messages from other processes received from Redis for a workspace open here, "
            "by kind (events, ephemeral, catch_up)",
            ["kind"],
            registry=r,
        )
        self.bridge_dropped = Counter(
            "atrium_bridge_messages_dropped",
            "Messages not relayed, by reason (unavailable: Redis away or the breaker open; "
            "queue_full; invalid: a message received that did not parse)",
            ["reason"],
            registry=r,
        )
        self.bridge_catch_ups = Counter(
            "atrium_bridge_catch_ups",
            "Workspaces told to catch up from the log: when the bridge (re)subscribed, and "
            "every second while it is degraded",
            registry=r,
        )
        self.workspace_gap_fills = Counter(
            "atrium_workspace_gap_fills",
            "Events workspaces read from the log because they had not reached them (a gap "
            "in what arrived, a catch-up after a reconnect, another process's commit)",
            registry=r,
        )
        self._samplers: list[Sampler] = []

    def add_sampler(self, sampler: Sampler) -> None:
        """Run ``sampler`` before each scrape (it sets gauges from a query)."""
        self._samplers.append(sampler)

    def watch(self, collector: Collector) -> None:
        """Register a collector that reads live state when scraped."""
        self.registry.register(collector)

    async def sample(self) -> None:
        """Run the samplers, each within SAMPLE_TIMEOUT; one that fails or times out
        leaves its gauges as they were (a scrape must not fail for a slow database)."""
        for sampler in self._samplers:
            with trio.move_on_after(SAMPLE_TIMEOUT):
                try:
                    await sampler()
                except Exception as error:  # reported, never raised into a scrape
                    log.warning("metrics sampler failed: %s", error)

    async def exposition(self) -> bytes:
        """The text exposition of every metric, after sampling."""
        await self.sample()
        return generate_latest(self.registry)


class LiveState(Collector):
    """Gauges read from the supervision tree and the pool when scraped.

    ``tree`` returns the process's root supervisor; ``pool`` returns ``(size, idle)`` of
    the current pool, or None while there is none.
    """

    def __init__(
        self,
        tree: Callable[[], Supervisor | None],
        pool: Callable[[], tuple[int, int] | None],
    ) -> None:
        self._tree = tree
        self._pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "atrium_workspaces_running", "Workspace actors running in this process"
        )
        depth = GaugeMetricFamily(
            "atrium_workspace_mailbox_depth", "Messages waiting in all workspace mailboxes"
        )
        restarts = CounterMetricFamily(
            "atrium_supervisor_restarts",
            "Restarts of each supervised child (workspace actors summed as workspace:*) "
            "since its supervisor started",
            labels=["supervisor", "child"],
        )
        children_down = GaugeMetricFamily(
            "atrium_supervisor_children_down",
            "Children of each supervisor that are not running",
            labels=["supervisor"],
        )
        root = self._tree()
        if root is not None:
            totals = _Totals()
            _walk(root.snapshot(), "", totals)
            running.add_metric([], totals.workspaces)
            depth.add_metric([], totals.mailbox)
            for (sup, child), count in sorted(totals.restarts.items()):
                restarts.add_metric([sup, child], count)
            for sup, count in sorted(totals.down.items()):
                children_down.add_metric([sup], count)
        yield from (running, depth, restarts, children_down)
        pool = self._pool()
        if pool is not None:
            size, idle = pool
            yield GaugeMetricFamily(
                "atrium_db_pool_connections", "Connections open in the asyncpg pool", size
            )
            yield GaugeMetricFamily(
                "atrium_db_pool_in_use", "Pool connections checked out now", size - idle
            )


class _Totals:
    __slots__ = ("workspaces", "mailbox", "restarts", "down")

    def __init__(self) -> None:
        self.workspaces = 0
        self.mailbox = 0
        self.restarts: dict[tuple[str, str], int] = {}
        self.down: dict[str, int] = {}


def _walk(tree: SupervisorSnapshot, prefix: str, totals: _Totals) -> None:
    path = prefix + tree.name
    totals.down.setdefault(path, 0)
    for child in tree.children:
        # One series per workspace would grow with every project ever opened.
        name = "workspace:*" if child.name.startswith("workspace:") else child.name
        if name == "workspace:*" and child.state == "running":
            totals.workspaces += 1
            totals.mailbox += child.mailbox_depth or 0
        key = (path, name)
        totals.restarts[key] = totals.restarts.get(key, 0) + child.restart_count
        if child.state != "running" and child.restart == "permanent":
            totals.down[path] += 1
        if child.supervisor is not None:
            _walk(child.supervisor, path + "/", totals)


class MetricsApp:
    """A tiny ASGI app: ``GET /metrics`` (or ``/``) answers the text exposition."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:  # nothing to start or stop; hypercorn waits for the answers
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] in ("/", "/metrics") and scope["method"] in ("GET", "HEAD"):
            status, content_type = 200, CONTENT_TYPE_LATEST.encode()
            body = await self._metrics.exposition()
        else:
            status, content_type, body = 404, b"text/plain", b"not found: try /metrics\n"
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {
                "type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else body,
                "more_body": False,
            }
        )


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``metrics`` on ``host:port`` (hypercorn) until cancelled; reports the bound
    port (``port`` 0 picks a free one)."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                hypercorn_serve, MetricsApp(metrics), config, shutdown_trigger=trio.sleep_forever
            )
        )
        task_status.started(int(binds[0].rpartition(":")[2]))
