"""The worker side of the job queue: claims, leases, outcomes, the reaper, retention.

A job actor claims in fair order (:func:`claim`: the user with the fewest running jobs,
then priority, then age; per-user running limits) with ``FOR UPDATE SKIP LOCKED`` (two
claimers never get the same row) and holds the job under a lease: a fresh
``lease_token`` per claim and a ``lease_expires_at`` it renews by heartbeat
(:func:`heartbeat`). Every write about a running attempt names its token, so a worker
whose lease was reaped (it stalled, its process died) changes nothing any more. Times come
from the caller's clock, never from ``now()`` in SQL. Each state change appends its event
in the same transaction (``jobs.log_changes``), as every write of the queue does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from ..core import json_output
from ..core.events import Event
from ..core.jobs import Job, may_run_jobs
from ..core.roles import Role
from ..core.timestamps import utc_iso
from .database import Database
from .jobs import JOB_CHANNEL, JOB_COLUMNS, Changed, job_from_row, log_changes, to_json

# Advisory lock space of claims (as ``jobs._SUBMIT_LOCK``, keyed by user).
_CLAIM_LOCK = 0x6A6F6201
"""Held by a claim of a user's job from choosing the user to its commit."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now runs, the token its writes must carry, and its JOB_STARTED
    (``events``, as in ``Changed``)."""

    job: Job
    token: uuid.UUID
    events: list[Event] = field(default_factory=list)


# The last attempt, patched: ``attempts`` with its final element merged with $patch.
_PATCH_LAST = (
    "jsonb_set(attempts, ARRAY[(jsonb_array_length(attempts) - 1)::text],"
    " (attempts -> -1) || {}::jsonb)"
)

# An error longer than this is cut where it is stored (the row, its attempt, its event):
# a task's message may quote its input.
MAX_ERROR_CHARS = 2000


def _bounded(error: str) -> str:
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[: MAX_ERROR_CHARS - 40]}... ({len(error):,} characters, cut)"


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
        return Claimed(job, token, await log_changes(conn, [job]))

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
            f" RETURNING {JOB_COLUMNS}{wake}",
            claimed.job.id,
            claimed.token,
            to_json(patch),
            *args,
        )
        if row is None:
            return None
        job = job_from_row(row)
        return Changed(job, await log_changes(conn, [job]))

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
            f" FROM expired s WHERE j.id = s.id RETURNING {JOB_COLUMNS},"
            f" CASE WHEN s.status = 'queued' THEN pg_notify('{JOB_CHANNEL}', '') END",
            now,
            utc_iso(now),
            limit,
        )
        jobs = [job_from_row(r) for r in rows]
        events = await log_changes(conn, jobs)
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
