"""What operators and estimates read about the job queue: jobs by state, the dead jobs,
and a waiting job's place in the fair order (``job_runs.claim``'s order)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..core.jobs import COUNTED_STATES, Job, JobStatus
from .database import Database
from .jobs import LISTED_COLUMNS, RUNNING_OF, job_from_row


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
        f"SELECT {LISTED_COLUMNS} FROM jobs j WHERE status = 'dead'"
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


@dataclass(frozen=True, slots=True)
class QueuePlace:
    """Where a waiting job stands in the fair order (see ``job_runs.claim``)."""

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
    ``job_runs.claim`` would start the waiting jobs.

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
    f"   CROSS JOIN LATERAL (SELECT {RUNNING_OF.format('j.user_id')} AS running) r"
    "   WHERE j.id = $1 AND j.status IN ('queued', 'failed')),"
    f" {_WAITING_USERS},"
    " others AS (SELECT (SELECT count(*) FROM"
    "     (SELECT w.priority, w.seq, row_number() OVER (ORDER BY w.priority DESC, w.seq) AS k"
    "      FROM jobs w WHERE w.status IN ('queued', 'failed') AND w.user_id = u.user_id"
    "      ORDER BY w.priority DESC, w.seq LIMIT greatest(0, me.turn - r.running + 1)) x"
    "     WHERE x.k <= me.turn - r.running OR x.priority > me.priority"
    "     OR (x.priority = me.priority AND x.seq < me.seq)) AS ahead"
    "   FROM waiting u CROSS JOIN me"
    f"   CROSS JOIN LATERAL (SELECT {RUNNING_OF.format('u.user_id')} AS running) r"
    "   WHERE u.user_id IS NOT NULL AND u.user_id <> me.user_id)"
    " SELECT me.own_ahead, me.running, (SELECT coalesce(sum(ahead), 0) FROM others)"
    "   AS others_ahead,"
    " (SELECT avg(extract(epoch FROM c.completed_at - c.started_at)) FROM"
    "    (SELECT completed_at, started_at FROM jobs WHERE task_name = $2"
    "     AND status = 'completed' ORDER BY completed_at DESC LIMIT 50) c) AS mean"
    " FROM me"
)
