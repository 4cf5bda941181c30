"""The ``jobs`` supervisor: the job actors, the lease reaper and job retention."""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial
from typing import Any

import trio

from ..core.jobs import JobStatus
from ..persistence import job_runs
from ..persistence.database import DatabaseUnavailable
from ..persistence.jobs import JOB_CHANNEL
from ..supervision import Backoff, ChildSpec, Strategy, Supervisor, supervisor_spec
from ._actor import JobActor
from ._queue import JobQueue
from ._workers import WorkerPool

log = logging.getLogger("atrium.jobs")

RETENTION_INTERVAL = 600.0


class Reaper:
    """Takes back running jobs whose lease expired, every half lease."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.reaped = 0

    def snapshot_detail(self) -> dict[str, int]:
        return {"jobs_reaped": self.reaped}

    async def run(self, *, task_status: trio.TaskStatus[Reaper] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            await self.reap_once()
            await trio.sleep(self.queue.settings.lease_seconds / 2)

    async def reap_once(self) -> int:
        """One pass; returns how many jobs it took back. A database outage is skipped."""
        try:
            reaped = await job_runs.reap_expired(self.queue.db, now=self.queue.now())
        except DatabaseUnavailable as error:
            log.warning("job reaper: %s", error)
            return 0
        for change in reaped:
            log.warning("job %s: lease expired; now %s", change.job.id, change.job.status)
            await self.queue.changed(change)
        if any(change.job.status is JobStatus.QUEUED for change in reaped):
            self.queue.wake()
        self.reaped += len(reaped)
        return len(reaped)


async def _run_listener(queue: JobQueue, *, task_status: trio.TaskStatus[None]) -> None:
    """Wake this process's actors when any process queues a job (PostgreSQL NOTIFY), so
    workers start jobs submitted elsewhere within milliseconds; polling stays the fallback.
    A lost connection is noticed by a ping every few polls and listened on again."""
    task_status.started()
    await queue.db.follow(
        JOB_CHANNEL,
        lambda _: queue.wake(),
        ping_seconds=queue.settings.poll_seconds * 5,
        on_listen=queue.wake,  # whatever was queued while nobody listened
    )


async def _run_retention(queue: JobQueue, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    while True:
        before = queue.now() - timedelta(days=queue.settings.retention_days)
        try:
            while (pruned := await job_runs.prune_finished(queue.db, before=before)) > 0:
                log.info("job retention: deleted %d finished jobs", pruned)
        except DatabaseUnavailable as error:
            log.warning("job retention: %s", error)
        await trio.sleep(RETENTION_INTERVAL)


async def _run_actor(
    queue: JobQueue, workers: WorkerPool, name: str, *, task_status: trio.TaskStatus[JobActor]
) -> None:
    await JobActor(queue, name, workers).run(task_status=task_status)


async def _run_workers(workers: WorkerPool, *, task_status: trio.TaskStatus[WorkerPool]) -> None:
    await workers.run(task_status=task_status)


async def _run_reaper(queue: JobQueue, *, task_status: trio.TaskStatus[Reaper]) -> None:
    await Reaper(queue).run(task_status=task_status)


def jobs_spec(queue: JobQueue) -> ChildSpec[Supervisor]:
    """The ``jobs`` subtree: ``job_workers`` (the worker processes for CPU-heavy steps,
    one per actor), ``job_1`` .. ``job_N`` (N = concurrency), ``job_reaper``,
    ``job_listener`` and, unless retention keeps everything, ``job_retention``.
    One-for-one: an actor that crashes is replaced alone; database outages never count as
    crashes. Children stop in reverse order, so the actors (and the steps they run in the
    worker processes) stop before the processes are closed."""
    settings = queue.settings
    # A stopping actor drains its job for drain_seconds, then releases it.
    stop = settings.drain_seconds + 5.0
    workers = WorkerPool(max(1, settings.concurrency), memory_mb=settings.worker_memory_mb)
    children: list[ChildSpec[Any]] = [
        ChildSpec("job_workers", partial(_run_workers, workers), shutdown_timeout=stop)
    ]
    children += [
        ChildSpec(
            f"job_{i}", partial(_run_actor, queue, workers, f"job_{i}"), shutdown_timeout=stop
        )
        for i in range(1, settings.concurrency + 1)
    ]
    children.append(ChildSpec("job_reaper", partial(_run_reaper, queue)))
    children.append(ChildSpec("job_listener", partial(_run_listener, queue)))
    if settings.retention_days > 0:
        children.append(ChildSpec("job_retention", partial(_run_retention, queue)))
    return supervisor_spec(
        "jobs",
        *children,
        strategy=Strategy.ONE_FOR_ONE,
        max_restarts=10,
        period=60.0,
        backoff=Backoff(base=0.1, maximum=5.0),
    )
