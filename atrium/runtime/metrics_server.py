"""The process's metrics endpoint: the gauges read from the supervision tree and the pool
when scraped (``LiveState``), and the small hypercorn server that answers ``GET /metrics``
with the registry of ``atrium.core.metrics``. The registry is vocabulary every layer counts
into; this serves it and so belongs to the runtime."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.failures import ContainedFailures
from ..core.metrics import Metrics
from ..seams import hypercorn_server
from ..supervision import Supervisor, SupervisorSnapshot


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
        documents = GaugeMetricFamily(
            "atrium_documents_running", "Live document actors running in this process"
        )
        document_depth = GaugeMetricFamily(
            "atrium_document_mailbox_depth", "Messages waiting in all live document mailboxes"
        )
        restarts = CounterMetricFamily(
            "atrium_supervisor_restarts",
            "Restarts of each supervised child (workspace actors summed as workspace:*, "
            "live document actors as document:*) since its supervisor started",
            labels=["supervisor", "child"],
        )
        escalations = CounterMetricFamily(
            "atrium_supervisor_escalations",
            "Escalations of each nested supervisor (more than its max_restarts within its "
            "period: it stopped its children and failed to its parent) since its parent "
            "started",
            labels=["supervisor"],
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
            documents.add_metric([], totals.documents)
            document_depth.add_metric([], totals.document_mailbox)
            for (sup, child), count in sorted(totals.restarts.items()):
                restarts.add_metric([sup, child], count)
            for sup, count in sorted(totals.escalations.items()):
                escalations.add_metric([sup], count)
            for sup, count in sorted(totals.down.items()):
                children_down.add_metric([sup], count)
        yield from (running, depth, documents, document_depth, restarts, escalations)
        yield children_down
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
    __slots__ = (
        "workspaces",
        "mailbox",
        "documents",
        "document_mailbox",
        "restarts",
        "escalations",
        "down",
    )

    def __init__(self) -> None:
        self.workspaces = 0
        self.mailbox = 0
        self.documents = 0
        self.document_mailbox = 0
        self.restarts: dict[tuple[str, str], int] = {}
        self.escalations: dict[str, int] = {}  # by the path of the supervisor that escalated
        self.down: dict[str, int] = {}


def _walk(tree: SupervisorSnapshot, prefix: str, totals: _Totals) -> None:
    path = prefix + tree.name
    totals.down.setdefault(path, 0)
    for child in tree.children:
        # One series per workspace (or document) would grow with every one ever opened.
        name = child.name
        if name.startswith("workspace:"):
            name = "workspace:*"
            if child.state == "running":
                totals.workspaces += 1
                totals.mailbox += child.mailbox_depth or 0
        elif name.startswith("document:"):
            name = "document:*"
            if child.state == "running":
                totals.documents += 1
                totals.document_mailbox += child.mailbox_depth or 0
        key = (path, name)
        totals.restarts[key] = totals.restarts.get(key, 0) + child.restart_count
        if child.kind == "supervisor":
            totals.escalations[f"{path}/{child.name}"] = child.escalation_count
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


# What a metrics connection lets out (logged once; the metrics server goes on). As the HTTP
# server's, through the same seam; the counts are not exported.
_FAILURES = ContainedFailures()


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
                hypercorn_server.serve,
                MetricsApp(metrics),
                config,
                contain=partial(_FAILURES.record, "connection", context={"transport": "metrics"}),
                shutdown_trigger=trio.sleep_forever,
            )
        )
        task_status.started(int(binds[0].rpartition(":")[2]))
