"""Background jobs: the durable queue. The ``jobs`` row is the truth of a job.

Life of a row (docs/JOBS.md draws it)::

    queued -> running -> completed
                      -> failed     (will run again at next_attempt_at) -> running ...
                      -> dead       (no retries left, or a task said "do not retry")
                      -> cancelled
    queued | failed -> cancelled

A job actor claims in fair order (:func:`claim`: the user with the fewest running jobs,
then priority, then age; per-user running and queued limits) with ``FOR UPDATE SKIP
LOCKED`` (two claimers never get the same row) and holds the job under a lease: a fresh
``lease_token`` per claim and a ``lease_expires_at`` it renews by heartbeat. Every
write about a running attempt names its token, so a worker whose lease was reaped (it
stalled, its process died) changes nothing any more. Times come from the caller's
clock, never from ``now()`` in SQL, so tests can drive leases and backoff with a fake one.

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
(:func:`run_refusal`). ``priority`` high is for a project's owners, on that project.

Reads never load a payload, and only one job's status read loads a result: listings read
the columns they show and the sizes of both (``payload_bytes``, ``result_bytes``, kept by
PostgreSQL beside them). Only a job actor's claim reads a payload, to run it.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from ..core import json_output
from ..core.events import Event, EventType
from ..core.roles import Action, Role, can
from ..core.timestamps import utc_iso
from .database import Database
from .errors import ProjectNotFound, RoleForbidden
from .events import append_event, notify_appended

JOB_CHANNEL = "atrium_jobs"
"""Notified (``pg_notify``) when a job may be due now: every process's actors wake."""

# Advisory lock spaces: the first key of ``pg_advisory_xact_lock(int, int)``; the second is
# ``hashtext`` of a user id (two users sharing a key only wait on each other, never more).
_CLAIM_LOCK = 0x6A6F6201
"""Held by a claim of a user's job from choosing the user to its commit."""
_SUBMIT_LOCK = 0x6A6F6202
"""Held by a submission from its insert to its commit (the queued limit)."""
# The longest Retry-After a submission over the queued limit is told.
_MAX_RETRY_AFTER = 600


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


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    user_id: uuid.UUID
    project_id: uuid.UUID | None
    task_name: str
    payload: dict[str, Any] | None
    """None when not read: only a job actor's claim reads it (and :func:`load_job`)."""
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
    """None until completed, and in listings (only :func:`get_job` reads it)."""
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
class Changed:
    """A job just after a state change, and the events that change appended to its
    project's log in the same transaction (none for a job without a project, or whose
    project is gone), to publish once committed."""

    job: Job
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now runs, the token its writes must carry, and its JOB_STARTED
    (``events``, as in ``Changed``)."""

    job: Job
    token: uuid.UUID
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[Job]
    total: int


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job
    created: bool
    """False when the idempotency key named an earlier job, which is returned instead."""
    events: list[Event]
    """JOB_QUEUED, appended in the submitting transaction for a new job of a project."""


def _json(value: Any) -> str:
    return json_output.dumps(value).decode()


def _loads(raw: Any) -> Any:
    return None if raw is None else orjson.loads(raw)


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        project_id=row["project_id"],
        task_name=row["task_name"],
        payload=_loads(row.get("payload")),
        priority=Priority(row["priority"]),
        status=JobStatus(row["status"]),
        timeout_seconds=row["timeout_seconds"],
        max_retries=row["max_retries"],
        attempt_count=row["attempt_count"],
        budget_from=row["budget_from"],
        attempts=_loads(row["attempts"]),
        progress=row["progress"],
        progress_message=row["progress_message"],
        result=_loads(row.get("result")),
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
# instead). ``_ONE`` shows every attempt; ``_LISTED`` the last few (a job retried by hand
# again and again keeps them all, and a listing stays small whatever a job holds).
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
_ONE = f"{_SHOWN}, j.attempts"
_LISTED = (
    f"{_SHOWN}, jsonb_path_query_array(j.attempts,"
    f" '$[last-{LISTED_ATTEMPTS - 1} to last]') AS attempts"
)

# An error longer than this is cut where it is stored (the row, its attempt, its event):
# a task's message may quote its input.
MAX_ERROR_CHARS = 2000


def _bounded(error: str) -> str:
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[: MAX_ERROR_CHARS - 40]}... ({len(error):,} characters, cut)"


_EVENT_TYPES = {
    JobStatus.QUEUED: EventType.JOB_QUEUED,
    JobStatus.RUNNING: EventType.JOB_STARTED,
    JobStatus.COMPLETED: EventType.JOB_COMPLETED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.DEAD: EventType.JOB_DEAD,
    JobStatus.CANCELLED: EventType.JOB_FAILED,
}


async def _log(conn: asyncpg.Connection, jobs: Sequence[Job]) -> list[Event]:
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
                    conn, job.project_id, _EVENT_TYPES[job.status], job.user_id, event_payload(job)
                )
            )
        except ProjectNotFound:
            continue
    # The writer may be a worker process with no workspace of its own: the API processes'
    # workspaces learn of these events on commit (``Workspaces`` follows LOG_CHANNEL).
    await notify_appended(conn, events)
    return events


# The last attempt, patched: ``attempts`` with its final element merged with $patch.
_PATCH_LAST = (
    "jsonb_set(attempts, ARRAY[(jsonb_array_length(attempts) - 1)::text],"
    " (attempts -> -1) || {}::jsonb)"
)


async def _role(conn: asyncpg.Connection, project_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
    role = await conn.fetchval(
        "SELECT m.role FROM project_members m JOIN projects p ON p.id = m.project_id"
        " WHERE m.project_id = $1 AND m.user_id = $2 AND p.deleted_at IS NULL",
        project_id,
        user_id,
    )
    return None if role is None else Role(role)


def may_run_jobs(role: Role | None) -> bool:
    """Whether a member with ``role`` may submit (and so run) jobs in the project: the one
    rule of submit, retry and the claim."""
    return role is not None and can(role, Action.RUN_JOBS)


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
            role = await _role(conn, project_id, user_id)
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
            f" RETURNING {_ONE}, pg_notify('{JOB_CHANNEL}', '')",
            uuid.uuid4(),
            user_id,
            project_id,
            task_name,
            _json(payload),
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
            return Submitted(job, True, await _log(conn, [job]))
        earlier = await conn.fetchrow(
            f"SELECT {_ONE} FROM jobs j WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            idempotency_key,
        )
        assert earlier is not None  # the conflict that stopped the insert
        return Submitted(job_from_row(earlier), False, [])

    return await db.transaction(insert)


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
        f"SELECT {_RUNNING_OF.format('$1')} AS running,"
        " (SELECT avg(extract(epoch FROM c.completed_at - c.started_at)) FROM"
        "   (SELECT completed_at, started_at FROM jobs WHERE user_id = $1"
        "    AND status = 'completed' ORDER BY seq DESC LIMIT 20) c) AS mean",
        user_id,
    )
    assert row is not None
    mean = 1.0 if row["mean"] is None else float(row["mean"])
    raise QueueFull(limit, min(_MAX_RETRY_AFTER, max(1, math.ceil(mean / max(1, row["running"])))))


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


COUNTED_STATES = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.FAILED,
    JobStatus.DEAD,
    JobStatus.CANCELLED,
)


@dataclass(frozen=True, slots=True)
class JobCounts:
    """Jobs by state across all processes: every state of ``COUNTED_STATES`` (each
    present), and the jobs completed since a given moment (completed jobs are kept for
    JOB_RETENTION_DAYS and may be millions of rows: only a recent window is counted)."""

    by_state: dict[JobStatus, int]
    completed_recent: int
    """Jobs completed since the moment given to :func:`count_jobs`."""


async def count_jobs(db: Database, *, completed_since: datetime) -> JobCounts:
    """Count the jobs by state in one round trip. Each count is one state's index range
    (``jobs_queue``, ``jobs_leases``, ``jobs_finished``), never a scan of the table."""
    counts = " ".join(
        f"(SELECT count(*) FROM jobs WHERE status = '{state.value}') AS {state.value},"
        for state in COUNTED_STATES
    )
    row = await db.fetchrow(
        f"SELECT {counts} (SELECT count(*) FROM jobs WHERE status = 'completed'"
        " AND completed_at >= $1) AS completed",
        completed_since,
    )
    assert row is not None
    return JobCounts(
        {state: int(row[state.value]) for state in COUNTED_STATES}, int(row["completed"])
    )


async def list_dead(db: Database, *, limit: int) -> list[Job]:
    """The dead jobs of every user and project, the most recently dead first (at most
    ``limit``; the ``jobs_finished`` index serves them in order)."""
    rows = await db.fetch(
        f"SELECT {_LISTED} FROM jobs j WHERE status = 'dead'"
        " ORDER BY completed_at DESC, seq DESC LIMIT $1",
        limit,
    )
    return [job_from_row(row) for row in rows]


# The users with waiting jobs, one index probe each (a skip scan of ``jobs_waiting``).
_WAITING_USERS = (
    "waiting (user_id) AS ("
    "   (SELECT user_id FROM jobs WHERE status IN ('queued', 'failed')"
    "    ORDER BY user_id, priority DESC, seq LIMIT 1)"
    " UNION ALL"
    "   SELECT (SELECT j.user_id FROM jobs j WHERE j.status IN ('queued', 'failed')"
    "           AND j.user_id > w.user_id ORDER BY j.user_id, j.priority DESC, j.seq"
    "           LIMIT 1)"
    "   FROM waiting w WHERE w.user_id IS NOT NULL)"
)

# How many jobs the user of ``{}`` (a column) runs now (``jobs_run_slots``).
_RUNNING_OF = "(SELECT count(*) FROM jobs r WHERE r.status = 'running' AND r.user_id = {})"


@dataclass(frozen=True, slots=True)
class QueuePlace:
    """Where a waiting job stands in the fair order (see :func:`claim`)."""

    position: int
    """1 = the next job to start, across every user; 0 when the job is not waiting."""
    own_ahead: int
    """The same user's waiting jobs before it."""
    running: int
    """The same user's running jobs."""
    mean_seconds: float | None
    """The mean run time of this task's recent completed jobs (None before the first)."""


async def queue_position(db: Database, job: Job) -> QueuePlace:
    """The job's place in the fair order, if no job ended meanwhile: the order in which
    :func:`claim` would start the waiting jobs.

    Each waiting job gets a turn: its user's running jobs plus the user's waiting jobs
    before it. The claim takes the lowest turn first (the user with the fewest running
    jobs), then the highest priority, then the oldest. So the jobs before this one are
    its user's own before it and, of every other user, those with a lower turn, plus the
    one with the same turn if it goes first by priority and age: a few rows of each user
    read (``jobs_waiting``), never a user's whole backlog.
    """
    row = await db.fetchrow(_POSITION, job.id, job.task_name)
    if row is None:
        return QueuePlace(0, 0, 0, None)
    mean = row["mean"]
    return QueuePlace(
        1 + int(row["own_ahead"]) + int(row["others_ahead"]),
        int(row["own_ahead"]),
        int(row["running"]),
        None if mean is None else float(mean),
    )


# $1 the job, $2 its task. ``me.turn``: its user's running jobs plus their waiting jobs
# before it. Of another user with ``r.running`` running jobs, their k-th waiting job (in
# priority and age) has turn running + k - 1: those with k <= me.turn - running are before
# the job, and the next one is when it wins on priority, then age.
_POSITION = (
    "WITH RECURSIVE me AS (SELECT j.user_id, j.priority, j.seq, o.own_ahead, r.running,"
    "   o.own_ahead + r.running AS turn FROM jobs j"
    "   CROSS JOIN LATERAL (SELECT count(*) AS own_ahead FROM jobs w"
    "     WHERE w.status IN ('queued', 'failed') AND w.user_id = j.user_id"
    "     AND (w.priority > j.priority OR (w.priority = j.priority AND w.seq < j.seq))) o"
    f"   CROSS JOIN LATERAL (SELECT {_RUNNING_OF.format('j.user_id')} AS running) r"
    "   WHERE j.id = $1 AND j.status IN ('queued', 'failed')),"
    f" {_WAITING_USERS},"
    " others AS (SELECT (SELECT count(*) FROM"
    "     (SELECT w.priority, w.seq, row_number() OVER (ORDER BY w.priority DESC, w.seq) AS k"
    "      FROM jobs w WHERE w.status IN ('queued', 'failed') AND w.user_id = u.user_id"
    "      ORDER BY w.priority DESC, w.seq LIMIT greatest(0, me.turn - r.running + 1)) x"
    "     WHERE x.k <= me.turn - r.running OR x.priority > me.priority"
    "     OR (x.priority = me.priority AND x.seq < me.seq)) AS ahead"
    "   FROM waiting u CROSS JOIN me"
    f"   CROSS JOIN LATERAL (SELECT {_RUNNING_OF.format('u.user_id')} AS running) r"
    "   WHERE u.user_id IS NOT NULL AND u.user_id <> me.user_id)"
    " SELECT me.own_ahead, me.running, (SELECT coalesce(sum(ahead), 0) FROM others)"
    "   AS others_ahead,"
    " (SELECT avg(extract(epoch FROM c.completed_at - c.started_at)) FROM"
    "    (SELECT completed_at, started_at FROM jobs WHERE task_name = $2"
    "     AND status = 'completed' ORDER BY completed_at DESC LIMIT 50) c) AS mean"
    " FROM me"
)


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
    columns: str = _ONE,
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
    return (await _visible(db, job_id, user_id, lock=False, columns=f"{_ONE}, j.result")).job


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
        if await _role_of(db, project_id, user_id) is None:
            raise ProjectNotFound()
        where, args = "j.project_id = $1", [project_id]
    else:
        where, args = _OWN, [user_id]
    if status is not None:
        args.append(status.value)
        where += f" AND j.status = ${len(args)}"
    args += [limit, offset]
    rows = await db.fetch(
        f"SELECT {_LISTED}, count(*) OVER () AS total FROM jobs j"
        f" WHERE {where} ORDER BY j.seq DESC LIMIT ${len(args) - 1} OFFSET ${len(args)}",
        *args,
    )
    if rows:
        total = int(rows[0]["total"])
    else:
        args = args[:-2]
        total = int(await db.fetchval(f"SELECT count(*) FROM jobs j WHERE {where}", *args))
    return JobPage([job_from_row(r) for r in rows], total)


async def _role_of(db: Database, project_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
    async def read(conn: asyncpg.Connection) -> Role | None:
        return await _role(conn, project_id, user_id)

    return await db.transaction(read)


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
                f"UPDATE jobs j SET cancel_requested = true WHERE id = $1 RETURNING {_ONE}",
                job_id,
            )
            assert row is not None
            return Changed(job_from_row(row))
        if job.status not in (JobStatus.QUEUED, JobStatus.FAILED):
            raise JobStateConflict(f"The job is {job.status} and cannot be cancelled")
        row = await conn.fetchrow(
            "UPDATE jobs j SET status = 'cancelled', completed_at = $2, error = 'cancelled'"
            f" WHERE id = $1 RETURNING {_ONE}",
            job_id,
            now,
        )
        assert row is not None
        cancelled = job_from_row(row)
        return Changed(cancelled, await _log(conn, [cancelled]))

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
            row = await conn.fetchrow(f"SELECT {_ONE} FROM jobs j WHERE id = $1 FOR UPDATE", job_id)
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
            f" RETURNING {_ONE}, pg_notify('{JOB_CHANNEL}', '')",
            job_id,
            now,
            int(priority),
        )
        assert row is not None
        queued = job_from_row(row)
        return Changed(queued, await _log(conn, [queued]))

    return await db.transaction(update)


async def run_refusal(db: Database, job: Job) -> str | None:
    """Why the claimed ``job`` must not run now, or None when it may. A job tied to a
    project runs only while the project exists and its creator holds a role there that
    may run jobs (``may_run_jobs``): rights are those of the moment the work runs. The job
    actor asks right after its claim, before the task reads anything."""
    if job.project_id is None:
        return None
    row = await db.fetchrow(
        "SELECT p.deleted_at IS NULL AS live, m.role FROM projects p"
        " LEFT JOIN project_members m ON m.project_id = p.id AND m.user_id = $2"
        " WHERE p.id = $1",
        job.project_id,
        job.user_id,
    )
    if row is None or not row["live"]:
        return "not run: the job's project no longer exists"
    if row["role"] is None:
        return "not run: the job's creator is no longer a member of its project"
    role = Role(row["role"])
    if not may_run_jobs(role):
        return (
            f"not run: the job's creator is now a {role} of its project,"
            f" and a {role} cannot run jobs there"
        )
    return None


# -- the worker side -------------------------------------------------------------------------


# The first due jobs of users running none that a claim considers: concurrent claimers
# that find one user's lock taken try the next of these users.
_IDLE_CANDIDATES = 8
# How far into the waiting jobs (in priority and age order) a claim looks for them.
_IDLE_WINDOW = 1000

# A claim that met another on the same run slot chooses again, at most this many times in
# all, then reports nothing due (its actor looks again within a poll).
_CLAIM_TRIES = 8


async def claim(
    db: Database,
    *,
    worker: str,
    now: datetime,
    lease_seconds: float,
    max_running: int | None = None,
) -> Claimed | None:
    """Take the next due job in fair order and start an attempt: ``running``, a new
    lease, the attempt counted and recorded, its JOB_STARTED logged. None when nothing is
    due (or every user with a due job already runs ``max_running`` jobs).

    Fair order: the user with the fewest running jobs first, then that user's job of the
    highest priority, then their oldest; so one user's backlog makes another's job wait
    for at most one job to end. ``max_running`` (None: no limit) holds across every
    process that claims, in the database itself: a running job holds one of its user's
    ``max_running`` run slots, unique among the user's running jobs (``jobs_run_slots``),
    so two claims at once that took the same slot cannot both commit; the second fails
    and chooses again. Concurrent claimers try the users in fair order without waiting
    (an advisory lock per user), so they spread across users instead of meeting on one.
    """
    token = uuid.uuid4()
    expires = now + timedelta(seconds=lease_seconds)

    async def take(conn: asyncpg.Connection) -> Claimed | None:
        # A queue's churn outruns its statistics: believing few jobs wait, the planner
        # reads a whole index (waiting and long-claimed entries) as a bitmap where the
        # claim needs the first few entries in order.
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        row = await conn.fetchrow(
            _CLAIM, now, token, worker, expires, utc_iso(now), max_running, _CLAIM_LOCK
        )
        if row is None:
            return None
        job = job_from_row(row)
        return Claimed(job, token, await _log(conn, [job]))

    for _ in range(_CLAIM_TRIES):
        try:
            return await db.transaction(take)
        except asyncpg.UniqueViolationError:
            # Another claim took the same run slot of the same user and committed first.
            continue
    return None


# $1 now, $6 the running limit (or NULL), $7 the lock space. The users with a due job and
# room under the limit, in fair order: fewest running first, then their next job's
# priority and age. Few users run jobs (no more than there are job actors): ``busy`` are
# they, each with their next job. Every other user runs none: the best of them own the
# first due jobs in (priority, age) order that are not a busy user's (``jobs_queue``),
# looked for only when no user is busy or ``walk`` (users with waiting jobs in id order,
# one probe each, stopping at the first not busy) found such a user, and among the first
# ``_IDLE_WINDOW`` waiting jobs (the busy users' waiting jobs are at most actors x
# JOB_MAX_QUEUED_PER_USER, under it by default; when none is found there, the user
# ``walk`` found stands in, so no one waits for busy users' backlogs to shrink).
# ``chosen`` is the first user whose lock is free, locked, or else the first of all; the
# lock is tried on the sorted rows one at a time, so no other user's lock is taken.
_FAIR_USER = (
    "busy AS MATERIALIZED (SELECT user_id, count(*) AS running FROM jobs"
    "   WHERE status = 'running' GROUP BY user_id),"
    " walk (user_id) AS ("
    "   (SELECT user_id FROM jobs WHERE status IN ('queued', 'failed')"
    "    ORDER BY user_id, priority DESC, seq LIMIT 1)"
    "   UNION ALL SELECT (SELECT j.user_id FROM jobs j WHERE j.status IN ('queued', 'failed')"
    "     AND j.user_id > w.user_id ORDER BY j.user_id, j.priority DESC, j.seq LIMIT 1)"
    "   FROM walk w WHERE w.user_id IN (SELECT user_id FROM busy)),"
    " idle AS (SELECT user_id, priority, seq FROM (SELECT user_id, priority, seq,"
    "     next_attempt_at FROM jobs WHERE status IN ('queued', 'failed')"
    f"     ORDER BY priority DESC, seq LIMIT {_IDLE_WINDOW}) f"
    "   WHERE next_attempt_at <= $1 AND user_id <> ALL (ARRAY(SELECT user_id FROM busy))"
    "   AND (NOT EXISTS (SELECT 1 FROM busy)"
    "     OR EXISTS (SELECT 1 FROM walk WHERE user_id NOT IN (SELECT user_id FROM busy)))"
    f"   LIMIT {_IDLE_CANDIDATES}),"
    " fair AS MATERIALIZED (SELECT user_id FROM ("
    "     (SELECT DISTINCT ON (user_id) user_id, 0::bigint AS running, priority, seq"
    "      FROM idle ORDER BY user_id, priority DESC, seq)"
    "     UNION ALL SELECT b.user_id, b.running, h.priority, h.seq FROM busy b"
    "     CROSS JOIN LATERAL (SELECT priority, seq FROM jobs h"
    "       WHERE h.status IN ('queued', 'failed') AND h.user_id = b.user_id"
    "       AND h.next_attempt_at <= $1 ORDER BY h.priority DESC, h.seq LIMIT 1) h"
    "     WHERE $6::integer IS NULL OR b.running < $6"
    "     UNION ALL SELECT w.user_id, 0::bigint, h.priority, h.seq FROM walk w"
    "     CROSS JOIN LATERAL (SELECT priority, seq FROM jobs h"
    "       WHERE h.status IN ('queued', 'failed') AND h.user_id = w.user_id"
    "       AND h.next_attempt_at <= $1 ORDER BY h.priority DESC, h.seq LIMIT 1) h"
    "     WHERE NOT EXISTS (SELECT 1 FROM idle)"
    "     AND w.user_id NOT IN (SELECT user_id FROM busy)) c"
    "   ORDER BY running, priority DESC, seq),"
    " chosen AS (SELECT user_id FROM ("
    "   (SELECT user_id FROM fair"
    "    WHERE pg_try_advisory_xact_lock($7, hashtext(user_id::text)) LIMIT 1)"
    "   UNION ALL (SELECT user_id FROM fair LIMIT 1)) c LIMIT 1)"
)

# The chosen user's next due job, and a run slot of theirs that no running job of theirs
# holds (one at random: two claims of the same user at once seldom meet on one).
_CLAIM = (
    f"WITH RECURSIVE {_FAIR_USER},"
    " next AS (SELECT id FROM jobs WHERE status IN ('queued', 'failed')"
    "   AND user_id = (SELECT user_id FROM chosen) AND next_attempt_at <= $1"
    "   ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED),"
    " slot AS (SELECT (SELECT s FROM generate_series(0, $6::integer - 1) s"
    "   WHERE s NOT IN (SELECT r.run_slot FROM jobs r WHERE r.status = 'running'"
    "     AND r.user_id = (SELECT user_id FROM chosen) AND r.run_slot IS NOT NULL)"
    "   ORDER BY random() LIMIT 1) AS s)"
    " UPDATE jobs j SET status = 'running', lease_token = $2, lease_owner = $3,"
    " lease_expires_at = $4, started_at = coalesce(j.started_at, $1), run_slot = slot.s,"
    " attempt_count = j.attempt_count + 1, progress = 0, progress_message = NULL,"
    " attempts = j.attempts || jsonb_build_object('n', jsonb_array_length(j.attempts) + 1,"
    "   'started_at', $5::text, 'worker', $3::text)"
    " FROM next, slot WHERE j.id = next.id AND ($6::integer IS NULL OR slot.s IS NOT NULL)"
    " RETURNING j.*"
)


async def heartbeat(
    db: Database, claimed: Claimed, *, now: datetime, lease_seconds: float
) -> bool | None:
    """Renew the lease; return whether a cancel was requested, or None when the lease is
    no longer ours (reaped, or the job was taken back)."""
    return await db.fetchval(  # type: ignore[no-any-return]
        "UPDATE jobs SET lease_expires_at = $3 WHERE id = $1 AND lease_token = $2"
        " AND status = 'running' RETURNING cancel_requested",
        claimed.job.id,
        claimed.token,
        now + timedelta(seconds=lease_seconds),
    )


async def set_progress(db: Database, claimed: Claimed, percent: int, message: str | None) -> bool:
    """Record the running attempt's progress; False when the lease is no longer ours."""
    status = await db.execute(
        "UPDATE jobs SET progress = $3, progress_message = $4"
        " WHERE id = $1 AND lease_token = $2 AND status = 'running'",
        claimed.job.id,
        claimed.token,
        percent,
        message,
    )
    return status == "UPDATE 1"


async def _finish(
    db: Database,
    claimed: Claimed,
    sets: str,
    patch: Mapping[str, Any],
    *args: Any,
    notify: bool = False,
) -> Changed | None:
    """End the claimed attempt (``sets``, the attempt patched) and log the job's event, in
    one transaction; None when the lease is no longer ours (nothing written)."""
    wake = f", pg_notify('{JOB_CHANNEL}', '')" if notify else ""

    async def write(conn: asyncpg.Connection) -> Changed | None:
        row = await conn.fetchrow(
            f"UPDATE jobs j SET {sets}, lease_token = NULL, lease_expires_at = NULL,"
            f" attempts = {_PATCH_LAST.format('$3')}"
            f" WHERE id = $1 AND lease_token = $2 AND status = 'running'"
            f" RETURNING {_ONE}{wake}",
            claimed.job.id,
            claimed.token,
            _json(patch),
            *args,
        )
        if row is None:
            return None
        job = job_from_row(row)
        return Changed(job, await _log(conn, [job]))

    return await db.transaction(write)


async def complete(
    db: Database,
    claimed: Claimed,
    *,
    now: datetime,
    result: Any,
    max_result_bytes: int | None = None,
) -> Changed | None:
    """The attempt succeeded: ``completed`` with ``result``. A result longer as JSON than
    ``max_result_bytes`` is not stored: the job is ``dead`` with an error naming the limit
    (JOB_MAX_RESULT_BYTES; the same input would make the same result). None if the lease
    was lost."""
    encoded = json_output.dumps(result)
    if max_result_bytes is not None and len(encoded) > max_result_bytes:
        error = (
            f"result too large: {len(encoded):,} bytes as JSON, over JOB_MAX_RESULT_BYTES"
            f" ({max_result_bytes:,}); it was not stored"
        )
        return await fail(db, claimed, now=now, error=error, retry_at=None)
    return await _finish(
        db,
        claimed,
        "status = 'completed', result = $4::jsonb, completed_at = $5, progress = 100, error = NULL",
        {"ended_at": utc_iso(now), "outcome": "completed", "error": None},
        encoded.decode(),
        now,
    )


async def fail(
    db: Database, claimed: Claimed, *, now: datetime, error: str, retry_at: datetime | None
) -> Changed | None:
    """The attempt failed with ``error``: ``failed`` until ``retry_at``, or ``dead`` when
    ``retry_at`` is None. None if the lease was lost. An error past ``MAX_ERROR_CHARS`` is
    cut."""
    error = _bounded(error)
    if retry_at is None:
        return await _finish(
            db,
            claimed,
            "status = 'dead', error = $4, completed_at = $5",
            {"ended_at": utc_iso(now), "outcome": "dead", "error": error},
            error,
            now,
        )
    return await _finish(
        db,
        claimed,
        "status = 'failed', error = $4, next_attempt_at = $5",
        {"ended_at": utc_iso(now), "outcome": "failed", "error": error},
        error,
        retry_at,
    )


async def finish_cancelled(db: Database, claimed: Claimed, *, now: datetime) -> Changed | None:
    """A running job stopped on request: ``cancelled``. None if the lease was lost."""
    return await _finish(
        db,
        claimed,
        "status = 'cancelled', error = 'cancelled', completed_at = $4",
        {"ended_at": utc_iso(now), "outcome": "cancelled", "error": "cancelled"},
        now,
    )


async def release(db: Database, claimed: Claimed, *, now: datetime) -> Changed | None:
    """Hand a running job back (its worker is stopping): ``queued`` again at once, and the
    attempt does not count. None if the lease was lost."""
    return await _finish(
        db,
        claimed,
        "status = 'queued', attempt_count = attempt_count - 1, next_attempt_at = $4",
        {"ended_at": utc_iso(now), "outcome": "released", "error": None},
        now,
        notify=True,
    )


async def reap_expired(db: Database, *, now: datetime, limit: int = 100) -> list[Changed]:
    """Take back running jobs whose lease expired (their worker died or stalled): the
    attempt counts and ends with an error; the job is queued again at once, ``dead`` when
    it has no attempt left, ``cancelled`` when a cancel was requested. Their events are
    logged in the same transaction, so a worker that claims a re-queued job logs its
    JOB_STARTED after the JOB_QUEUED."""
    patch = _PATCH_LAST.format(
        "jsonb_build_object('ended_at', $2::text, 'outcome', s.status,"
        " 'error', 'the worker stopped renewing its lease (lost or killed)')"
    )

    async def reap(conn: asyncpg.Connection) -> list[Changed]:
        rows = await conn.fetch(
            "WITH expired AS (SELECT id, CASE WHEN cancel_requested THEN 'cancelled'"
            "   WHEN attempt_count - budget_from > max_retries THEN 'dead' ELSE 'queued' END"
            "   AS status FROM jobs WHERE status = 'running' AND lease_expires_at < $1"
            "   ORDER BY lease_expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
            " UPDATE jobs j SET status = s.status, lease_token = NULL, lease_expires_at = NULL,"
            " next_attempt_at = $1, error = 'the worker stopped renewing its lease',"
            " completed_at = CASE WHEN s.status = 'queued' THEN NULL ELSE $1 END,"
            f" attempts = {patch}"
            f" FROM expired s WHERE j.id = s.id RETURNING {_ONE},"
            f" CASE WHEN s.status = 'queued' THEN pg_notify('{JOB_CHANNEL}', '') END",
            now,
            utc_iso(now),
            limit,
        )
        jobs = [job_from_row(r) for r in rows]
        events = await _log(conn, jobs)
        return [Changed(job, [e for e in events if _event_of(e, job)]) for job in jobs]

    return await db.transaction(reap)


def _event_of(event: Event, job: Job) -> bool:
    return bool(event.payload["job_id"] == f"job_{job.id}")


async def prune_finished(db: Database, *, before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` finished jobs (completed, dead, cancelled) that finished
    before ``before``; return how many."""
    status = await db.execute(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs"
        " WHERE status IN ('completed', 'dead', 'cancelled') AND completed_at < $1 LIMIT $2)",
        before,
        limit,
    )
    return int(status.rsplit(" ", 1)[-1])


async def project_snapshot(db: Database, project_id: uuid.UUID) -> dict[str, Any] | None:
    """The project row and its members as plain JSON values (for the export task); None
    when the project is missing or deleted."""
    row = await db.fetchrow(
        "SELECT id, name, description, visibility, owner_id, created_at, updated_at"
        " FROM projects WHERE id = $1 AND deleted_at IS NULL",
        project_id,
    )
    if row is None:
        return None
    members = await db.fetch(
        "SELECT m.user_id, u.email, m.role, m.invited_at, m.invited_by FROM project_members m"
        " JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 ORDER BY m.invited_at",
        project_id,
    )
    return {
        "project": {k: _plain(v) for k, v in row.items()},
        "members": [{k: _plain(v) for k, v in m.items()} for m in members],
    }


async def project_events(
    db: Database,
    project_id: uuid.UUID,
    *,
    after_seq: int = 0,
    limit: int = 5000,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` events of the project after ``after_seq`` in seq order, optionally
    within ``[since, until)``, as plain JSON values."""
    rows = await db.fetch(
        "SELECT seq, type, actor_id, payload, created_at FROM project_events"
        " WHERE project_id = $1 AND seq > $2"
        " AND ($4::timestamptz IS NULL OR created_at >= $4)"
        " AND ($5::timestamptz IS NULL OR created_at < $5)"
        " ORDER BY seq LIMIT $3",
        project_id,
        after_seq,
        limit,
        since,
        until,
    )
    return [
        {
            "seq": r["seq"],
            "type": r["type"],
            "actor_id": _plain(r["actor_id"]),
            "payload": _loads(r["payload"]),
            "created_at": _plain(r["created_at"]),
        }
        for r in rows
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return utc_iso(value)
    return value
