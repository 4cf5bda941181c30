"""The in-process side of the job queue: settings, the clock, wake-ups and watchers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import trio

from ..core.config import DEFAULTS
from ..core.events import Event
from ..core.jobs import Job, JobStatus
from ..core.metrics import Metrics
from ..persistence import jobs as store
from ..persistence.database import Database
from ..persistence.job_runs import Claimed
from ..tasks import TaskRegistry
from ..tasks import registry as default_registry
from ._policy import RetryPolicy


@dataclass(frozen=True, slots=True)
class JobSettings:
    """How this process runs jobs."""

    concurrency: int = DEFAULTS.worker_concurrency
    """Job actors in this process (WORKER_CONCURRENCY); 0 runs none."""
    max_running_per_user: int | None = DEFAULTS.job_max_running_per_user
    """One user's jobs running at once across every process (JOB_MAX_RUNNING_PER_USER);
    None: no limit. Below the actors of a process, so another user's job finds one free."""
    max_queued_per_user: int | None = DEFAULTS.job_max_queued_per_user
    """One user's jobs waiting to run (JOB_MAX_QUEUED_PER_USER); more is refused, 429."""
    lease_seconds: float = DEFAULTS.job_lease_seconds
    """A running job's lease (JOB_LEASE_SECONDS); renewed every third of it."""
    default_timeout: float = DEFAULTS.job_timeout_seconds
    default_max_retries: int = DEFAULTS.max_job_retries
    retention_days: int = DEFAULTS.job_retention_days
    """Finished jobs older than this are deleted (JOB_RETENTION_DAYS); 0 keeps them."""
    poll_seconds: float = 1.0
    """Idle actors look for due jobs at least this often (retries, other processes)."""
    drain_seconds: float = 5.0
    """A stopping actor lets its job run this long, then releases it back to the queue."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_payload_bytes: int = DEFAULTS.job_max_payload_bytes
    """A payload longer as JSON is refused at submission (JOB_MAX_PAYLOAD_BYTES)."""
    max_result_bytes: int = DEFAULTS.job_max_result_bytes
    """A result longer as JSON is not stored: the job is dead (JOB_MAX_RESULT_BYTES)."""
    worker_memory_mb: int = DEFAULTS.job_worker_memory_mb
    """Address-space limit of each job worker process (JOB_WORKER_MEMORY_MB); 0: none."""
    progress_interval: float = 0.25
    """A running job's progress is written and sent at most once per this many seconds;
    reports in between are coalesced (the latest wins)."""

    @property
    def heartbeat_seconds(self) -> float:
        # Also how soon a cancel requested through another process is seen.
        return min(self.lease_seconds / 3, 0.5)


class JobRunner(Protocol):
    """What the queue needs of whoever runs a job here (a ``JobActor``): a way to stop it."""

    def cancel_job(self, job_id: uuid.UUID) -> None:
        """Stop the task of ``job_id`` now, if it is the one this runner runs."""
        ...


class JobObserver(Protocol):
    """Told of every job state change and progress report this process makes (live
    workspace events)."""

    async def job_changed(self, job: Job, events: Sequence[Event]) -> None:
        """``job`` changed state here and committed; ``events`` are what that change
        appended to its project's log (none for a job without a project)."""
        ...

    async def job_progress(self, job: Job, percent: int, message: str | None) -> None: ...


class JobQueue:
    """Shared by the HTTP layer and the job actors of one process.

    ``wake()`` after a submission rouses idle actors at once (same process; other
    processes poll every ``poll_seconds``). ``metrics`` counts the attempts its actors run.
    ``changed(change)`` after every state change
    wakes whoever waits in :meth:`wait_for`. Running actors register here so a cancel
    reaches a job's cancel scope at once.
    """

    def __init__(
        self,
        settings: JobSettings,
        *,
        database: Callable[[], Database],
        registry: TaskRegistry = default_registry,
        clock: Callable[[], float] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = registry
        self._database = database
        self._clock = clock
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        self._running: dict[uuid.UUID, JobRunner] = {}
        self.observers: list[JobObserver] = []

    @property
    def db(self) -> Database:
        """The current pool (a restarted pool replaces the old one)."""
        return self._database()

    def now(self) -> datetime:
        """Wall-clock time from the queue's clock: job rows never use SQL ``now()``."""
        seconds = trio.current_time() if self._clock is None else self._clock()
        return datetime.fromtimestamp(seconds, UTC)

    def wake(self) -> None:
        """A job may be due now: rouse every idle actor."""
        self._wakeup.set()
        self._wakeup = trio.Event()

    def wakeup(self) -> trio.Event:
        """The event the next :meth:`wake` sets. Take it *before* looking for work, so a
        submission between the look and the wait is not missed."""
        return self._wakeup

    async def changed(self, change: store.Changed | Claimed | store.Submitted) -> None:
        """Record a committed state change made here: wake waiters and tell observers."""
        self._changed.set()
        self._changed = trio.Event()
        for observer in self.observers:
            await observer.job_changed(change.job, change.events)

    async def progressed(self, job: Job, percent: int, message: str | None) -> None:
        """Tell observers of a running job's progress report."""
        for observer in self.observers:
            await observer.job_progress(job, percent, message)

    async def wait_for(self, job_id: uuid.UUID, statuses: Collection[JobStatus]) -> Job:
        """Wait until the job is in one of ``statuses``; see :meth:`wait_until`."""
        return await self.wait_until(job_id, lambda job: job.status in statuses)

    async def wait_until(self, job_id: uuid.UUID, done: Callable[[Job], bool]) -> Job:
        """Wait until ``done(job)`` holds and return the job. Changes made in this process
        wake the wait at once; others' are seen within ``poll_seconds``. Callers bound the
        wait (``trio.fail_after``)."""
        while True:
            changed = self._changed
            job = await store.load_job(self.db, job_id)
            if job is not None and done(job):
                return job
            with trio.move_on_after(self.settings.poll_seconds):
                await changed.wait()

    def register(self, job_id: uuid.UUID, runner: JobRunner) -> None:
        """``runner`` runs ``job_id`` now: a cancel reaches it through :meth:`cancel_local`."""
        self._running[job_id] = runner

    def unregister(self, job_id: uuid.UUID) -> None:
        self._running.pop(job_id, None)

    def cancel_local(self, job_id: uuid.UUID) -> bool:
        """Stop the job's task now if an actor of this process runs it; True if so."""
        runner = self._running.get(job_id)
        if runner is None:
            return False
        runner.cancel_job(job_id)
        return True
