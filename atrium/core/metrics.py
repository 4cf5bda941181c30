"""Prometheus metrics of one process: what is counted, and what is read at scrape time.

One ``Metrics`` per process (the composition root makes it; it outlives a restarted
child), each with its own ``CollectorRegistry``: tests run several servers in one
process, and the global default registry would mix their counts (and refuse the second
registration of a name).

Hot paths only increment pre-bound children (no label lookup per event): a broadcast adds
its fan-out once, a query observes one histogram. Gauges of live state (open workspaces,
mailbox depth, pool use, supervisor restarts) are read by ``LiveState`` when scraped
(``atrium.runtime.metrics_server``, which also serves the registry), and the job
queue's depth by state is sampled by one query per scrape (``sample``), so nothing is
kept up to date between scrapes.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("atrium.metrics")

SAMPLE_TIMEOUT = 2.0
# Requests and queries: 1 ms .. 10 s (the default buckets start at 5 ms, coarse for reads).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Collections: 1 ms .. 2.5 s (a young one is about a millisecond; an old one over a large
# heap, seconds).
_GC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TRANSPORTS = ("main", "listener")
# atrium_jobs_completed_recent counts the jobs completed within this window (all of them
# may be millions of rows: JOB_RETENTION_DAYS keeps them).
COMPLETED_WINDOW = timedelta(minutes=5)
# The operator console's latency percentiles cover about this many recent seconds (the
# Prometheus histograms count since the process started: a dashboard takes its own rates).
RECENT_WINDOW = 300.0
_RECENT_SLOTS = 10  # the window moves in steps of RECENT_WINDOW / _RECENT_SLOTS

Sampler = Callable[[], Awaitable[None]]


class Metrics:
    """The metrics of one process and the registry that serves them; ``clock`` (monotonic
    seconds) places observations in the window of the console's recent percentiles."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
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
        self.recent_requests = RecentHistogram(_LATENCY_BUCKETS, clock)
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
        self.recent_queries = RecentHistogram(_LATENCY_BUCKETS, clock)
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
            "Jobs by state (queued, running, failed: waiting for a retry, dead, "
            "cancelled), across all processes: read from the database on scrape",
            ["state"],
            registry=r,
        )
        self.jobs_completed_recent = Gauge(
            "atrium_jobs_completed_recent",
            "Jobs completed within the last 5 minutes, across all processes: read from "
            "the database on scrape",
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
            "the log position of events it could not publish earlier; document_updates, "
            "document_awareness, document_catch_up: the same for live documents)",
            ["kind"],
            registry=r,
        )
        self.bridge_received = Counter(
            "atrium_bridge_messages_received",
            "Messages from other processes received from Redis for a workspace or live "
            "document open here, by kind (events, ephemeral, catch_up, document_updates, "
            "document_awareness, document_catch_up)",
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
        self.gc_pause_seconds = Histogram(
            "atrium_gc_pause_seconds",
            "Time the cyclic garbage collector held the process (every task, every "
            "connection), by generation collected",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=r,
        )
        self._gc_pauses = [self.gc_pause_seconds.labels(str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._samplers: list[Sampler] = []

    @contextmanager
    def timing_gc(self) -> Iterator[None]:
        """Observe every collection of the cyclic garbage collector in
        ``atrium_gc_pause_seconds`` for the block. A collection stops the whole process
        (in a join storm a middle-generation one of a million objects took over a second:
        docs/BENCHMARKS.md), so it is what to look at when every latency jumps at once."""
        gc.callbacks.append(self._on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc_pauses[info["generation"]].observe(time.perf_counter() - self._gc_started)

    def set_job_counts(self, by_state: Mapping[str, int], completed_recent: int) -> None:
        """Set the job gauges from one count of the queue (``by_state``: state to jobs)."""
        for state, count in by_state.items():
            self.jobs.labels(str(state)).set(count)
        self.jobs_completed_recent.set(completed_recent)

    def observe_query(self, seconds: float) -> None:
        """Count one database round trip of ``seconds``."""
        self.db_query_seconds.observe(seconds)
        self.recent_queries.observe(seconds)

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

    async def summary(self) -> dict[str, Any]:
        """The key figures of this process, after sampling, as JSON-ready values (for the
        operator console): totals since the process started, latency percentiles of the
        last RECENT_WINDOW seconds estimated from the histograms' buckets as Prometheus'
        ``histogram_quantile`` does (None when there was no observation in the window),
        and the live gauges (None for a figure this process does not have, such as the
        pool before the database is up)."""
        await self.sample()
        values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                values[key] = values.get(key, 0.0) + sample.value
        figures = _Figures(values)
        hits = figures.total("atrium_project_cache_lookups_total", result="hit")
        misses = figures.total("atrium_project_cache_lookups_total", result="miss")
        return {
            "http": {
                "requests": int(figures.total("atrium_http_requests_total")),
                "server_errors": int(
                    figures.total("atrium_http_requests_total", status=lambda s: s[0] == "5")
                ),
                "client_errors": int(
                    figures.total("atrium_http_requests_total", status=lambda s: s[0] == "4")
                ),
                "latency_seconds": _percentiles(self.recent_requests.cumulative()),
            },
            "websockets": {
                "open": {
                    t: int(figures.total("atrium_ws_connections_open", transport=t))
                    for t in TRANSPORTS
                },
                "frames_in": int(figures.total("atrium_ws_frames_in_total")),
                "frames_out": int(figures.total("atrium_ws_frames_out_total")),
                "deliveries": int(figures.total("atrium_ws_deliveries_total")),
                "slow_consumer_closes": int(figures.total("atrium_ws_slow_consumer_closes_total")),
            },
            "workspaces": {
                "running": figures.maybe("atrium_workspaces_running"),
                "mailbox_depth": figures.maybe("atrium_workspace_mailbox_depth"),
            },
            "documents": {
                "running": figures.maybe("atrium_documents_running"),
                "mailbox_depth": figures.maybe("atrium_document_mailbox_depth"),
            },
            "database": {
                "pool_connections": figures.maybe("atrium_db_pool_connections"),
                "pool_in_use": figures.maybe("atrium_db_pool_in_use"),
                "query_latency_seconds": _percentiles(self.recent_queries.cumulative()),
            },
            "project_cache": {
                "hits": int(hits),
                "misses": int(misses),
                "hit_ratio": hits / (hits + misses) if hits + misses else None,
            },
            "jobs": {
                "by_state": {
                    labels["state"]: int(v) for labels, v in figures.matching("atrium_jobs")
                },
                "completed_recent": int(figures.total("atrium_jobs_completed_recent")),
            },
            "supervision": {
                "restarts": int(figures.total("atrium_supervisor_restarts_total")),
                "escalations": int(figures.total("atrium_supervisor_escalations_total")),
            },
        }


_Match = str | Callable[[str], bool]


class _Figures:
    """Sums over one collection of samples (name and labels to value)."""

    def __init__(self, values: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
        self._values = values

    def matching(self, name: str, **labels: _Match) -> Iterator[tuple[dict[str, str], float]]:
        """The samples called ``name`` whose labels match ``labels`` (a value, or a test
        of the value): their labels and values."""
        for (sample, frozen), value in self._values.items():
            if sample != name:
                continue
            have = dict(frozen)
            if all(
                key in have and (want(have[key]) if callable(want) else have[key] == want)
                for key, want in labels.items()
            ):
                yield have, value

    def total(self, name: str, **labels: _Match) -> float:
        """The sum of the samples called ``name`` whose labels match ``labels``."""
        return sum(value for _, value in self.matching(name, **labels))

    def maybe(self, name: str) -> int | None:
        """The value of an unlabelled gauge, None when it has no sample."""
        found = [value for _, value in self.matching(name)]
        return int(sum(found)) if found else None


class RecentHistogram:
    """Counts by bucket of the observations of about the last RECENT_WINDOW seconds.

    Time is cut into _RECENT_SLOTS slots and the oldest slot drops out whole, so the
    counts cover between nine tenths of the window and all of it, and memory stays at
    slots × buckets counts whatever the rate. ``clock`` gives monotonic seconds.
    """

    def __init__(self, buckets: tuple[float, ...], clock: Callable[[], float]) -> None:
        self._bounds = (*buckets, math.inf)
        self._clock = clock
        self._slot_seconds = RECENT_WINDOW / _RECENT_SLOTS
        self._slots: deque[tuple[int, list[int]]] = deque()  # (slot number, counts)

    def observe(self, value: float) -> None:
        """Count ``value`` in the current slot (in the first bucket whose bound holds it)."""
        slot = self._expire()
        if not self._slots or self._slots[-1][0] != slot:
            self._slots.append((slot, [0] * len(self._bounds)))
        self._slots[-1][1][bisect_left(self._bounds, value)] += 1

    def cumulative(self) -> list[tuple[float, float]]:
        """``(upper bound, observations up to it)`` for every bucket, the last bound +Inf,
        over the slots still in the window."""
        self._expire()
        running, result = 0, []
        for index, bound in enumerate(self._bounds):
            running += sum(counts[index] for _, counts in self._slots)
            result.append((bound, float(running)))
        return result

    def _expire(self) -> int:
        """Drop the slots that left the window; return the current slot's number."""
        slot = int(self._clock() // self._slot_seconds)
        while self._slots and self._slots[0][0] <= slot - _RECENT_SLOTS:
            self._slots.popleft()
        return slot


def _percentiles(cumulative: list[tuple[float, float]]) -> dict[str, float] | None:
    """p50, p95 and p99 from cumulative bucket counts, or None when there are none."""
    if not cumulative or cumulative[-1][1] == 0:
        return None
    return {f"p{round(q * 100)}": _quantile(q, cumulative) for q in (0.5, 0.95, 0.99)}


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """The ``q`` quantile from cumulative bucket counts ``(upper bound, count)`` (the
    last bound is +Inf), interpolated linearly within its bucket; a quantile that falls
    in the +Inf bucket is the highest finite bound."""
    rank = q * cumulative[-1][1]  # > 0: the histogram has observations
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:  # the last bucket's count is the total: always reached
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    raise AssertionError("the cumulative counts do not end with the total")
