"""The jobs application service: what the API (and anyone else) does with jobs."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..core import json_output
from ..core.jobs import Job, JobPage, JobStatus, PayloadTooLarge, Priority
from ..core.metrics import COMPLETED_WINDOW
from ..persistence import job_reports
from ..persistence import jobs as store
from ..persistence.job_reports import JobCounts, QueuePlace, queue_position
from ..tasks import InvalidPayload
from ._events import JobEvents
from ._queue import JobQueue
from ._storable import refuse_unstorable

# Assumed run time of a task that has never completed, for the first estimates.
_DEFAULT_RUN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Submission:
    job: Job
    created: bool
    position_in_queue: int
    estimated_completion: datetime


class JobService:
    """Submits, reads, cancels and retries jobs, checking who may, and tells the job
    actors of this process (wake-ups, cancels) and its observers (state changes; with
    ``events``, a ``JobEvents`` that publishes them to projects' workspaces)."""

    def __init__(self, queue: JobQueue, events: JobEvents | None = None) -> None:
        self.queue = queue
        if events is not None:
            queue.observers.append(events)

    async def submit(
        self,
        user_id: uuid.UUID,
        *,
        task_name: str,
        payload: Any,
        priority: Priority = Priority.NORMAL,
        timeout_seconds: float | None = None,
        max_retries: int | None = None,
        project_id: uuid.UUID | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Validate and queue a job. Raises UnknownTask, InvalidPayload (naming the field:
        also for a value PostgreSQL or the run would refuse, see ``refuse_unstorable``),
        PayloadTooLarge, ProjectNotFound, RoleForbidden, PriorityForbidden."""
        queue = self.queue
        settings = queue.settings
        task = queue.registry.get(task_name)
        parsed = queue.registry.validate(task_name, payload)
        if task.needs_project and project_id is None:
            raise InvalidPayload("project_id", f"the task {task_name} needs a project_id")
        dumped = parsed.model_dump(mode="json")
        refuse_unstorable(parsed, dumped)
        size = len(json_output.dumps(dumped))
        if size > settings.max_payload_bytes:
            raise PayloadTooLarge(size, settings.max_payload_bytes)
        if timeout_seconds is None:
            timeout_seconds = settings.default_timeout
        if max_retries is None:
            max_retries = settings.default_max_retries
        submitted = await store.submit(
            queue.db,
            user_id=user_id,
            task_name=task_name,
            payload=dumped,
            priority=priority,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            now=queue.now(),
            project_id=project_id,
            idempotency_key=idempotency_key,
            max_queued=settings.max_queued_per_user,
        )
        job = submitted.job
        if submitted.created:
            queue.wake()
            await queue.changed(submitted)
        place = await queue_position(queue.db, job)
        return Submission(job, submitted.created, place.position, self._estimate(place))

    def _estimate(self, place: QueuePlace) -> datetime:
        """When a job at ``place`` should be done: one run per wave of jobs ahead of it,
        as many to a wave as this process has actors or, when its user's running limit
        is the tighter bound, as many as that user may run."""
        settings = self.queue.settings
        run = _DEFAULT_RUN_SECONDS if place.mean_seconds is None else place.mean_seconds
        waves = math.ceil(place.position / max(1, settings.concurrency))
        if settings.max_running_per_user is not None:
            own = place.running + place.own_ahead + 1
            waves = max(waves, math.ceil(own / settings.max_running_per_user))
        return self.queue.now() + timedelta(seconds=run * max(1, waves))

    async def get(self, job_id: uuid.UUID, user_id: uuid.UUID) -> Job:
        """The job if ``user_id`` may see it. Raises JobNotFound."""
        return await store.get_job(self.queue.db, job_id, user_id)

    async def list(
        self,
        user_id: uuid.UUID,
        *,
        status: JobStatus | None = None,
        project_id: uuid.UUID | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> JobPage:
        """The user's jobs, or a project's (members only), newest first."""
        return await store.list_jobs(
            self.queue.db, user_id, status=status, project_id=project_id, limit=limit, offset=offset
        )

    async def cancel(self, job_id: uuid.UUID, user_id: uuid.UUID) -> Job:
        """Cancel: a waiting job at once; a running one is stopped by its actor (at once in
        this process, within a heartbeat elsewhere). Its creator may while a member of its
        project (any role), and the project's owners. Raises JobNotFound, JobForbidden,
        JobStateConflict."""
        change = await store.cancel(self.queue.db, job_id, user_id, self.queue.now())
        if change.job.status is JobStatus.RUNNING:
            self.queue.cancel_local(job_id)
        else:
            await self.queue.changed(change)
        return change.job

    async def retry(self, job_id: uuid.UUID, user_id: uuid.UUID | None) -> Job:
        """Queue a failed, dead or cancelled job again; ``user_id`` None is the operator,
        who may retry any job; others need, now, to be its creator or a project owner, and
        a role that may run jobs in its project. Raises as :meth:`cancel`."""
        change = await store.retry(self.queue.db, job_id, user_id, self.queue.now())
        self.queue.wake()
        await self.queue.changed(change)
        return change.job

    async def counts(self) -> JobCounts:
        """The jobs of every process by state, and those completed within the last
        ``COMPLETED_WINDOW`` (the console's and the metrics' figures)."""
        since = self.queue.now() - COMPLETED_WINDOW
        return await job_reports.count_jobs(self.queue.db, completed_since=since)

    async def dead(self, limit: int) -> Sequence[Job]:
        """The dead jobs of every user and project, most recently dead first (at most
        ``limit``): the operator's view, whoever created them."""
        return await job_reports.list_dead(self.queue.db, limit=limit)
