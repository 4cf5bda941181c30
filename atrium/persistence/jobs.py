"""Background jobs: the durable queue. The ``jobs`` row is the truth of a job; its life
and vocabulary (``Job``, ``JobStatus``, the refusals) are ``atrium.core.jobs``.

This module holds the rows and what users do with them: submit (:func:`submit`, with the
per-user queued limit), read, list, cancel and retry. The worker side (claims, leases,
outcomes, the reaper) is ``job_runs``; counts and a job's place in the queue are
``job_reports``.

Times come from the caller's clock, never from ``now()`` in SQL, so tests can drive
leases and backoff with a fake one.

Every state change of a job tied to a project appends its event (JOB_QUEUED, JOB_STARTED,
JOB_COMPLETED, JOB_FAILED, JOB_DEAD; a cancelled job's is JOB_FAILED with status
``cancelled``) to the project's log in the same transaction as the row change: the job row
is locked first, then the project row by the seq counter, so the log holds a job's events
in the order of its history, and a crash between the two loses neither. Callers publish
the returned events after the commit.

Rights are those held now, never those held at submission (docs/JOBS.md, "Rights"). A job
without a project is its creator's alone. A job tied to a project is seen by the project's
members only (its creator included: one removed from the project gets ``JobNotFound``, as
for a job that does not exist); its creator, while a member of any role, and the project's
owners may cancel it; its creator, while a role that may run jobs there, and the owners may
retry it. A job actor runs a project job only while its creator still may run jobs there
(``job_runs.run_refusal``). ``priority`` high is for a project's owners, on that project.

Reads never load a payload, and only one job's status read loads a result: listings read
the columns they show and the sizes of both (``payload_bytes``, ``result_bytes``, kept by
PostgreSQL beside them). Only a job actor's claim reads a payload, to run it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from ..core import json_output
from ..core.events import Event
from ..core.jobs import (
    EVENT_TYPES,
    RETRYABLE,
    Job,
    JobForbidden,
    JobNotFound,
    JobPage,
    JobStateConflict,
    JobStatus,
    Priority,
    PriorityForbidden,
    QueueFull,
    event_payload,
    may_run_jobs,
)
from ..core.projects import ProjectNotFound, RoleForbidden
from ..core.roles import Role
from .database import Database
from .events import append_event, notify_appended
from .projects import member_role

JOB_CHANNEL = "atrium_jobs"
"""Notified (``pg_notify``) when a job may be due now: every process's actors wake."""

# Advisory lock space of submissions: the first key of ``pg_advisory_xact_lock(int, int)``;
# the second is ``hashtext`` of a user id (two users sharing a key only wait on each other,
# never more). Claims have their own (``job_runs``).
_SUBMIT_LOCK = 0x6A6F6202
"""Held by a submission from its insert to its commit (the queued limit)."""
# The longest Retry-After a submission over the queued limit is told.
_MAX_RETRY_AFTER = 600


@dataclass(frozen=True, slots=True)
class Changed:
    """A job just after a state change, and the events that change appended to its
    project's log in the same transaction (none for a job without a project, or whose
    project is gone), to publish once committed."""

    job: Job
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job
    created: bool
    """False when the idempotency key named an earlier job, which is returned instead."""
    events: list[Event]
    """JOB_QUEUED, appended in the submitting transaction for a new job of a project."""


def to_json(value: Any) -> str:
    return json_output.dumps(value).decode()


def _from_json(raw: Any) -> Any:
    return None if raw is None else orjson.loads(raw)


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        project_id=row["project_id"],
        task_name=row["task_name"],
        payload=_from_json(row.get("payload")),
        priority=Priority(row["priority"]),
        status=JobStatus(row["status"]),
        timeout_seconds=row["timeout_seconds"],
        max_retries=row["max_retries"],
        attempt_count=row["attempt_count"],
        budget_from=row["budget_from"],
        attempts=_from_json(row["attempts"]),
        progress=row["progress"],
        progress_message=row["progress_message"],
        result=_from_json(row.get("result")),
        error=row["error"],
        idempotency_key=row["idempotency_key"],
        cancel_requested=row["cancel_requested"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        next_attempt_at=row["next_attempt_at"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        payload_bytes=row["payload_bytes"],
        result_bytes=row["result_bytes"],
    )


# What reads of a job select: every column but the payload and the result (their sizes
# instead). ``JOB_COLUMNS`` shows every attempt; ``LISTED_COLUMNS`` the last few (a job
# retried by hand again and again keeps them all, and a listing stays small whatever a job
# holds).
_SHOWN = ", ".join(
    f"j.{column}"
    for column in (
        "id user_id project_id task_name priority status timeout_seconds max_retries"
        " attempt_count budget_from progress progress_message error idempotency_key"
        " cancel_requested created_at started_at completed_at next_attempt_at lease_owner"
        " lease_expires_at payload_bytes result_bytes"
    ).split()
)
LISTED_ATTEMPTS = 10
"""Listings show a job's last this many attempts; its status shows them all."""
JOB_COLUMNS = f"{_SHOWN}, j.attempts"
LISTED_COLUMNS = (
    f"{_SHOWN}, jsonb_path_query_array(j.attempts,"
    f" '$[last-{LISTED_ATTEMPTS - 1} to last]') AS attempts"
)


async def log_changes(conn: asyncpg.Connection, jobs: Sequence[Job]) -> list[Event]:
    """Append each job's event for the state it is now in to its project's log, inside the
    caller's transaction, projects in id order (two writers never wait on each other's
    project rows in a cycle), and notify ``LOG_CHANNEL`` on commit. A job without a
    project, or whose project was deleted, gets none: the job row stays the truth."""
    events: list[Event] = []
    for job in sorted(jobs, key=lambda j: (str(j.project_id), j.id.int)):
        if job.project_id is None:
            continue
        try:
            events.append(
                await append_event(
                    conn, job.project_id, EVENT_TYPES[job.status], job.user_id, event_payload(job)
                )
            )
        except ProjectNotFound:
            continue
    # The writer may be a worker process with no workspace of its own: the API processes'
    # workspaces learn of these events on commit (``Workspaces`` follows LOG_CHANNEL).
    await notify_appended(conn, events)
    return events


async def submit(
    db: Database,
    *,
    user_id: uuid.UUID,
    task_name: str,
    payload: Mapping[str, Any],
    priority: Priority,
    timeout_seconds: float,
    max_retries: int,
    now: datetime,
    project_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    max_queued: int | None = None,
) -> Submitted:
    """Queue a job (validated by the caller against its task) and return it.

    With ``project_id``, the user must be a member whose role may run jobs there:
    ``ProjectNotFound`` for a non-member (or a missing project), ``RoleForbidden`` for a
    viewer. ``Priority.HIGH`` needs an owner of the project (``PriorityForbidden``, also
    for a job without a project). An ``idempotency_key`` the same user used before returns
    that earlier job (``created`` False), whatever its state, and queues nothing.
    ``QueueFull`` when the user would have more than ``max_queued`` jobs waiting (see
    :func:`_within_queued`).
    """

    async def insert(conn: asyncpg.Connection) -> Submitted:
        role = None
        if project_id is not None:
            role = await member_role(conn, project_id, user_id)
            if role is None:
                raise ProjectNotFound()
            if not may_run_jobs(role):
                raise RoleForbidden(f"A {role} cannot run jobs in this project")
        if priority is Priority.HIGH and role is not Role.OWNER:
            raise PriorityForbidden()
        row = await conn.fetchrow(
            "INSERT INTO jobs AS j (id, user_id, project_id, task_name, payload, priority,"
            " status, timeout_seconds, max_retries, idempotency_key, created_at,"
            " next_attempt_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6, 'queued', $7, $8, $9, $10, $10)"
            " ON CONFLICT (user_id, idempotency_key) DO NOTHING"
            f" RETURNING {JOB_COLUMNS}, pg_notify('{JOB_CHANNEL}', '')",
            uuid.uuid4(),
            user_id,
            project_id,
            task_name,
            to_json(payload),
            int(priority),
            timeout_seconds,
            max_retries,
            idempotency_key,
            now,
        )
        if row is not None:
            job = job_from_row(row)
            if max_queued is not None:
                await _within_queued(conn, user_id, max_queued)
            return Submitted(job, True, await log_changes(conn, [job]))
        earlier = await conn.fetchrow(
            f"SELECT {JOB_COLUMNS} FROM jobs j WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            idempotency_key,
        )
        assert earlier is not None  # the conflict that stopped the insert
        return Submitted(job_from_row(earlier), False, [])

    return await db.transaction(insert)


async def _within_queued(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int) -> None:
    """Raise ``QueueFull`` (the caller's transaction then rolls back its insert) when the
    user now has more than ``limit`` jobs waiting to run, queued or failed (awaiting a
    retry). The user's submissions take turns from here to their commit, and the count
    is a statement of its own after the lock, so it sees each earlier one committed: two
    submissions at once cannot both slip under the limit, from any process."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::uuid::text))", _SUBMIT_LOCK, user_id
    )
    waiting = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status IN ('queued', 'failed')"
        " AND user_id = $1 LIMIT $2) w",
        user_id,
        limit + 1,
    )
    if waiting <= limit:
        return
    # A place frees when one of their waiting jobs starts, which is when one of their
    # running jobs ends: about their mean run time over the jobs they run at once.
    row = await conn.fetchrow(
        f"SELECT {RUNNING_OF.format('$1')} AS running,"
        " (SELECT avg(extract(epoch FROM c.completed_at - c.started_at)) FROM"
        "   (SELECT completed_at, started_at FROM jobs WHERE user_id = $1"
        "    AND status = 'completed' ORDER BY seq DESC LIMIT 20) c) AS mean",
        user_id,
    )
    assert row is not None
    mean = 1.0 if row["mean"] is None else float(row["mean"])
    raise QueueFull(limit, min(_MAX_RETRY_AFTER, max(1, math.ceil(mean / max(1, row["running"])))))


# How many jobs the user of ``{}`` (a column) runs now (``jobs_run_slots``).
RUNNING_OF = "(SELECT count(*) FROM jobs r WHERE r.status = 'running' AND r.user_id = {})"


@dataclass(frozen=True, slots=True)
class _Seen:
    """A job as one user may see it now."""

    job: Job
    role: Role | None
    """The user's role in the job's project now (None for a job without a project)."""
    creator: bool


async def _visible(
    conn: asyncpg.Connection | Database,
    job_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    lock: bool,
    columns: str = JOB_COLUMNS,
) -> _Seen:
    """The job (``columns`` of it) and ``user_id``'s role in its project now.
    ``JobNotFound`` when they may not see it: a job without a project is its creator's
    alone; a project job is its project's members' (not its creator's once removed)."""
    row = await conn.fetchrow(
        f"SELECT {columns}, m.role AS member_role FROM jobs j"
        " LEFT JOIN projects p ON p.id = j.project_id AND p.deleted_at IS NULL"
        " LEFT JOIN project_members m ON m.project_id = p.id AND m.user_id = $2"
        " WHERE j.id = $1" + (" FOR UPDATE OF j" if lock else ""),
        job_id,
        user_id,
    )
    if row is None:
        raise JobNotFound()
    job = job_from_row(row)
    role = None if row["member_role"] is None else Role(row["member_role"])
    if (job.user_id != user_id) if job.project_id is None else role is None:
        raise JobNotFound()
    return _Seen(job, role, job.user_id == user_id)


async def load_job(db: Database, job_id: uuid.UUID) -> Job | None:
    """The job, whoever asks (workers and operators, not the API)."""
    row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    return None if row is None else job_from_row(row)


async def get_job(db: Database, job_id: uuid.UUID, user_id: uuid.UUID) -> Job:
    """The job as ``user_id`` may see it now, with its result (not its payload);
    ``JobNotFound`` otherwise. The one read of the API that loads a result."""
    return (await _visible(db, job_id, user_id, lock=False, columns=f"{JOB_COLUMNS}, j.result")).job


# A user's own jobs, less those of projects they are no longer a member of.
_OWN = (
    "j.user_id = $1 AND (j.project_id IS NULL OR EXISTS (SELECT 1 FROM project_members m"
    " JOIN projects p ON p.id = m.project_id AND p.deleted_at IS NULL"
    " WHERE m.project_id = j.project_id AND m.user_id = $1))"
)


async def list_jobs(
    db: Database,
    user_id: uuid.UUID,
    *,
    status: JobStatus | None = None,
    project_id: uuid.UUID | None = None,
    limit: int = 20,
    offset: int = 0,
) -> JobPage:
    """Newest first: the user's own jobs (those of projects they left or were removed
    from excepted) or, with ``project_id``, every job of that project when the user is a
    member (``ProjectNotFound`` when not). No payload, no result: their sizes, and each
    job's last ``LISTED_ATTEMPTS`` attempts."""
    args: list[Any]
    if project_id is not None:
        if await member_role(db, project_id, user_id) is None:
            raise ProjectNotFound()
        where, args = "j.project_id = $1", [project_id]
    else:
        where, args = _OWN, [user_id]
    if status is not None:
        args.append(status.value)
        where += f" AND j.status = ${len(args)}"
    args += [limit, offset]
    rows = await db.fetch(
        f"SELECT {LISTED_COLUMNS}, count(*) OVER () AS total FROM jobs j"
        f" WHERE {where} ORDER BY j.seq DESC LIMIT ${len(args) - 1} OFFSET ${len(args)}",
        *args,
    )
    if rows:
        total = int(rows[0]["total"])
    else:
        args = args[:-2]
        total = int(await db.fetchval(f"SELECT count(*) FROM jobs j WHERE {where}", *args))
    return JobPage([job_from_row(r) for r in rows], total)


async def cancel(db: Database, job_id: uuid.UUID, user_id: uuid.UUID, now: datetime) -> Changed:
    """Cancel a job: a waiting one at once (``cancelled``, with its event); a running one
    is marked ``cancel_requested`` (no event yet) and its worker stops it. Its creator
    may, while a member of its project (any role), and the project's owners.
    ``JobNotFound``, ``JobForbidden`` for another member, ``JobStateConflict`` for a
    finished job."""

    async def update(conn: asyncpg.Connection) -> Changed:
        seen = await _visible(conn, job_id, user_id, lock=True)
        job = seen.job
        if not (seen.creator or seen.role is Role.OWNER):
            raise JobForbidden("Only the job's creator or a project owner may cancel it")
        if job.status is JobStatus.RUNNING:
            row = await conn.fetchrow(
                f"UPDATE jobs j SET cancel_requested = true WHERE id = $1 RETURNING {JOB_COLUMNS}",
                job_id,
            )
            assert row is not None
            return Changed(job_from_row(row))
        if job.status not in (JobStatus.QUEUED, JobStatus.FAILED):
            raise JobStateConflict(f"The job is {job.status} and cannot be cancelled")
        row = await conn.fetchrow(
            "UPDATE jobs j SET status = 'cancelled', completed_at = $2, error = 'cancelled'"
            f" WHERE id = $1 RETURNING {JOB_COLUMNS}",
            job_id,
            now,
        )
        assert row is not None
        cancelled = job_from_row(row)
        return Changed(cancelled, await log_changes(conn, [cancelled]))

    return await db.transaction(update)


def _may_retry(seen: _Seen) -> None:
    """Retrying needs, now: to be the creator or a project owner, and (for a project job)
    a role that may run jobs in the project. Raises JobForbidden."""
    if seen.role is Role.OWNER:
        return
    if not seen.creator:
        raise JobForbidden("Only the job's creator or a project owner may retry it")
    if seen.job.project_id is not None and not may_run_jobs(seen.role):
        raise JobForbidden(
            f"A {seen.role} cannot run jobs in this project: retrying needs a collaborator"
            " or an owner"
        )


async def retry(
    db: Database, job_id: uuid.UUID, user_id: uuid.UUID | None, now: datetime
) -> Changed:
    """Queue a failed, dead or cancelled job again now, with a fresh retry budget and its
    JOB_QUEUED; its attempts so far are kept. ``user_id`` None is the operator, who may
    retry any job. Anyone else needs the rights of :func:`_may_retry` now; a high-priority
    job keeps its priority only when an owner of its project (or the operator) retries it,
    and runs at normal priority otherwise. ``JobNotFound``, ``JobForbidden``,
    ``JobStateConflict`` (a job in another state)."""

    async def update(conn: asyncpg.Connection) -> Changed:
        if user_id is None:
            row = await conn.fetchrow(
                f"SELECT {JOB_COLUMNS} FROM jobs j WHERE id = $1 FOR UPDATE", job_id
            )
            if row is None:
                raise JobNotFound()
            job = job_from_row(row)
            priority = job.priority
        else:
            seen = await _visible(conn, job_id, user_id, lock=True)
            _may_retry(seen)
            job = seen.job
            keep = seen.role is Role.OWNER
            priority = job.priority if keep else min(job.priority, Priority.NORMAL)
        if job.status not in RETRYABLE:
            raise JobStateConflict(
                f"The job is {job.status}; only failed, dead or cancelled jobs can be retried"
            )
        row = await conn.fetchrow(
            "UPDATE jobs j SET status = 'queued', next_attempt_at = $2, cancel_requested = false,"
            " budget_from = attempt_count, completed_at = NULL, error = NULL, result = NULL,"
            " progress = 0, progress_message = NULL, priority = $3 WHERE id = $1"
            f" RETURNING {JOB_COLUMNS}, pg_notify('{JOB_CHANNEL}', '')",
            job_id,
            now,
            int(priority),
        )
        assert row is not None
        queued = job_from_row(row)
        return Changed(queued, await log_changes(conn, [queued]))

    return await db.transaction(update)
