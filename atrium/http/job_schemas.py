"""Request and response models of ``/api/v1/jobs`` (validation and the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, Field

from .schemas import _Strict

PriorityName = Literal["low", "normal", "high"]
StatusName = Literal["queued", "running", "completed", "failed", "dead", "cancelled"]


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: a 422 naming the field, never a 500 at the insert.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string stored as PostgreSQL text."""


class JobRunRequest(_Strict):
    task_name: Text = Field(min_length=1, max_length=100, description="See GET /api/v1/jobs/tasks")
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="Checked against the task's schema; at most JOB_MAX_PAYLOAD_BYTES as JSON",
    )
    priority: PriorityName = Field(
        default="normal", description="high: only an owner of the job's project"
    )
    timeout: float | None = Field(
        default=None, gt=0, le=86_400, description="Seconds per attempt (JOB_TIMEOUT_SECONDS)"
    )
    project_id: UUID | None = Field(default=None, description="Tie the job to a project")
    max_retries: int | None = Field(default=None, ge=0, le=20, description="MAX_JOB_RETRIES")
    idempotency_key: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The same key from the same user returns the first job (200)",
    )


class JobSubmitResponse(BaseModel):
    job_id: str = Field(description="job_<uuid>")
    status: StatusName
    estimated_completion: datetime
    position_in_queue: int = Field(description="1: next to run; 0: not waiting")


class JobProgress(BaseModel):
    percent: int
    message: str | None


class JobAttempt(BaseModel):
    n: int
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = Field(
        default=None, description="completed, failed, dead, cancelled, released, queued (reaped)"
    )
    error: str | None = None
    worker: str | None = None


class JobStatusResponse(BaseModel):
    job_id: str
    status: StatusName
    result: Any = None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When a failed job runs again")
    retry_count: int
    max_retries: int
    timeout: float
    task_name: str
    priority: PriorityName
    progress: JobProgress
    attempts: list[JobAttempt]
    project_id: UUID | None
    user_id: UUID
    payload_bytes: int = Field(description="The payload's size as stored JSON")
    result_bytes: int | None = Field(description="The result's size as stored JSON; null without")


class JobListQuery(BaseModel):
    status: StatusName | None = None
    project_id: UUID | None = None
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)


class JobListResponse(BaseModel):
    jobs: list[JobStatusResponse] = Field(
        description="Newest first; results are left out (their sizes stay), and each job"
        " shows its last 10 attempts"
    )
    total: int
    limit: int
    offset: int


class TaskResponse(BaseModel):
    name: str
    description: str
    needs_project: bool
    payload_schema: dict[str, Any]


class TaskListResponse(BaseModel):
    tasks: list[TaskResponse]
