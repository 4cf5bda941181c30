"""Jobs' vocabulary, free of I/O: what a job is, where it is in its life, who may run one,
the refusals of job operations, and what a job event in a project's log says.

Life of a job (docs/JOBS.md draws it)::

    queued -> running -> completed
                      -> failed     (will run again at next_attempt_at) -> running ...
                      -> dead       (no retries left, or a task said "do not retry")
                      -> cancelled
    queued | failed -> cancelled

The SQL that moves a job along lives in ``atrium.persistence.jobs`` (the queue and users'
operations) and ``atrium.persistence.job_runs`` (claims, leases and outcomes); the
sequences that call it in ``atrium.jobs``.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .events import EventType
from .roles import Action, Role, can
from .timestamps import utc_iso


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    """An attempt failed and the job runs again at ``next_attempt_at``."""
    DEAD = "dead"
    """No attempt left (or a "do not retry" error): the dead-letter state."""
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.DEAD, JobStatus.CANCELLED})
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.DEAD, JobStatus.CANCELLED})


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2


COUNTED_STATES = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.FAILED,
    JobStatus.DEAD,
    JobStatus.CANCELLED,
)
"""The states the console and the metrics count (completed jobs are counted by window)."""


def may_run_jobs(role: Role | None) -> bool:
    """Whether a member with ``role`` may submit (and so run) jobs in the project: the one
    rule of submit, retry and the claim."""
    return role is not None and can(role, Action.RUN_JOBS)


class JobError(Exception):
    """A refused job operation; ``code`` is stable."""

    code = "job_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(JobError):
    code = "job_not_found"

    def __init__(self) -> None:
        super().__init__("No such job")


class JobForbidden(JobError):
    """The caller may see the job but not change it (a viewer, a collaborator)."""

    code = "forbidden_role"


class JobStateConflict(JobError):
    """The job is not in a state that allows the operation (cancel a finished job, say)."""

    code = "job_state_conflict"


class PriorityForbidden(JobError):
    """``priority`` high asked by someone other than an owner of the job's project."""

    code = "priority_forbidden"

    def __init__(self) -> None:
        super().__init__("priority: high is for an owner of the job's project; use normal or low")


class PayloadTooLarge(JobError):
    """A payload longer, as JSON, than the limit (JOB_MAX_PAYLOAD_BYTES)."""

    code = "job_payload_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload: {size:,} bytes as JSON, over JOB_MAX_PAYLOAD_BYTES ({limit:,})")


class QueueFull(JobError):
    """The user already has as many jobs waiting to run as they may
    (JOB_MAX_QUEUED_PER_USER); ``retry_after`` is about when one of them will have
    started."""

    code = "job_queue_full"

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"You have {limit} jobs waiting to run, the most allowed"
            f" (JOB_MAX_QUEUED_PER_USER); retry in {retry_after} s"
        )
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    user_id: uuid.UUID
    project_id: uuid.UUID | None
    task_name: str
    payload: dict[str, Any] | None
    """None when not read: only a job actor's claim reads it (and ``persistence.jobs.load_job``)."""
    priority: Priority
    status: JobStatus
    timeout_seconds: float
    max_retries: int
    attempt_count: int
    budget_from: int
    attempts: list[dict[str, Any]]
    progress: int
    progress_message: str | None
    result: Any
    """None until completed, and in listings (only ``persistence.jobs.get_job`` reads it)."""
    error: str | None
    idempotency_key: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    payload_bytes: int
    """The payload's size as stored JSON text."""
    result_bytes: int | None
    """The result's size as stored JSON text; None without a result."""

    @property
    def retries_left(self) -> int:
        """Attempts still allowed after the current (counted) one: ``max_retries`` retries
        follow the first attempt."""
        return self.max_retries + 1 - (self.attempt_count - self.budget_from)

    @property
    def retry_count(self) -> int:
        """Attempts after the first that counted (the seed's ``retry_count``)."""
        return max(0, self.attempt_count - 1)


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[Job]
    total: int


EVENT_TYPES = {
    JobStatus.QUEUED: EventType.JOB_QUEUED,
    JobStatus.RUNNING: EventType.JOB_STARTED,
    JobStatus.COMPLETED: EventType.JOB_COMPLETED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.DEAD: EventType.JOB_DEAD,
    JobStatus.CANCELLED: EventType.JOB_FAILED,
}

"""The event a job's change to each state appends to its project's log."""


def event_payload(job: Job) -> dict[str, Any]:
    """What a job event in the project's log says about its job (results stay in the job:
    they can be large)."""
    payload: dict[str, Any] = {
        "job_id": f"job_{job.id}",
        "task_name": job.task_name,
        "status": job.status.value,
        "retry_count": job.retry_count,
    }
    if job.error is not None and job.status is not JobStatus.COMPLETED:
        payload["error"] = job.error
    if job.status is JobStatus.FAILED:
        payload["next_attempt_at"] = utc_iso(job.next_attempt_at)
    return payload
