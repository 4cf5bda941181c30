"""Job events in a project's log, against real PostgreSQL.

Each state change of a project's job appends its event in the transaction that changes
the row, so the log tells every job's history in order (a reaper's re-queue can never be
logged after the next worker's start) and a failure before the commit leaves neither.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing
from test_jobs_queue import WAIT, Rig, make_user, running_jobs, wait

from atrium.core.events import Event
from atrium.core.jobs import JobPage, JobStatus, Priority
from atrium.jobs import RetryPolicy
from atrium.persistence import exports, job_runs, projects
from atrium.persistence import jobs as store
from atrium.persistence.database import Database

Q = ("JOB_QUEUED", "queued")
S = ("JOB_STARTED", "running")
C = ("JOB_COMPLETED", "completed")
F = ("JOB_FAILED", "failed")
D = ("JOB_DEAD", "dead")
X = ("JOB_FAILED", "cancelled")


async def new_project(db: Database, owner: uuid.UUID) -> uuid.UUID:
    created = await projects.create_project(
        db, owner, name="P", description=None, visibility="private"
    )
    return created.value.id


async def job_log(db: Database, project_id: uuid.UUID, job_id: uuid.UUID) -> list[tuple[str, str]]:
    """The job's events in the project's log, in seq order, as (type, status)."""
    events = await exports.project_events(db, project_id)
    return [
        (e["type"], e["payload"]["status"])
        for e in events
        if e["payload"].get("job_id") == f"job_{job_id}"
    ]


def pairs(events: list[Event]) -> list[tuple[str, str]]:
    return [(str(e.type), e.payload["status"]) for e in events]


async def test_claim_complete_fail_retry_and_dead_are_logged_in_order(db: Database) -> None:
    rig = Rig()
    owner = await make_user(db, "owner")
    project = await new_project(db, owner)
    fast = RetryPolicy(base=0, jitter=0)
    async with running_jobs(db, rig.registry, concurrency=1, poll_seconds=0.05, retry=fast) as (
        queue,
        service,
        _,
    ):
        ok = await service.submit(owner, task_name="record", payload={}, project_id=project)
        bad = await service.submit(
            owner, task_name="fail", payload={}, project_id=project, max_retries=1
        )
        await wait(queue, ok.job.id, JobStatus.COMPLETED)
        await wait(queue, bad.job.id, JobStatus.DEAD)
        await service.retry(bad.job.id, owner)
        with trio.fail_after(WAIT):
            dead = await queue.wait_until(
                bad.job.id, lambda j: j.status is JobStatus.DEAD and j.attempt_count == 4
            )
    assert await job_log(db, project, ok.job.id) == [Q, S, C]
    assert await job_log(db, project, bad.job.id) == [Q, S, F, S, D, Q, S, F, S, D]
    assert [a["outcome"] for a in dead.attempts] == ["failed", "dead", "failed", "dead"]


async def test_cancel_and_retry_are_logged_in_order(db: Database) -> None:
    rig = Rig()
    owner = await make_user(db, "owner")
    project = await new_project(db, owner)
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, _):
        running = await service.submit(owner, task_name="hang", payload={}, project_id=project)
        with trio.fail_after(WAIT):
            await rig.started.wait()
        waiting = await service.submit(owner, task_name="record", payload={}, project_id=project)
        await service.cancel(waiting.job.id, owner)
        await service.cancel(running.job.id, owner)
        await wait(queue, running.job.id, JobStatus.CANCELLED)
        await service.retry(waiting.job.id, owner)
        await wait(queue, waiting.job.id, JobStatus.COMPLETED)
    assert await job_log(db, project, running.job.id) == [Q, S, X]
    assert await job_log(db, project, waiting.job.id) == [Q, X, Q, S, C]


async def test_reaped_job_is_requeued_in_the_log_before_the_next_start(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    rig = Rig()
    owner = await make_user(db, "owner")
    project = await new_project(db, owner)
    async with running_jobs(db, rig.registry, concurrency=0) as (queue, service, _):
        first = await service.submit(owner, task_name="record", payload={}, project_id=project)
        second = await service.submit(owner, task_name="record", payload={}, project_id=project)
        # The store alone, no observer: the events are the transactions' own work.
        lost = await job_runs.claim(db, worker="dead-worker", now=queue.now(), lease_seconds=10)
        assert lost is not None and lost.job.id == first.job.id
        assert pairs(lost.events) == [S]
        mock_clock.jump(11)
        (reaped,) = await job_runs.reap_expired(db, now=queue.now())
        assert reaped.job.id == first.job.id and pairs(reaped.events) == [Q]
        assert reaped.events[0].payload["retry_count"] == 0
        again = await job_runs.claim(db, worker="next-worker", now=queue.now(), lease_seconds=10)
        assert again is not None and again.job.id == first.job.id
        assert again.events[0].seq > reaped.events[0].seq
        assert again.events[0].payload["retry_count"] == 1
    assert await job_log(db, project, first.job.id) == [Q, S, Q, S]
    # The same through the job actors and their reaper: the second job's worker dies.
    async with running_jobs(db, rig.registry, concurrency=0) as (queue, _, _):
        dying = await job_runs.claim(db, worker="dead-worker", now=queue.now(), lease_seconds=10)
        assert dying is not None and dying.job.id == second.job.id
    async with running_jobs(db, rig.registry, concurrency=1, lease_seconds=10) as (queue, _, _):
        mock_clock.jump(11)
        await wait(queue, second.job.id, JobStatus.COMPLETED)
    assert await job_log(db, project, second.job.id) == [Q, S, Q, S, C]


class Crash(Exception):
    """Raised between a job's row update and its commit."""


async def test_failure_before_commit_leaves_neither_the_change_nor_the_event(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await make_user(db, "owner")
    project = await new_project(db, owner)
    real_append = store.append_event

    async def append_then_crash(*args: Any, **kwargs: Any) -> Event:
        await real_append(*args, **kwargs)  # row updated, event inserted: not committed
        raise Crash()

    async def broken(write: Any) -> None:
        monkeypatch.setattr(store, "append_event", append_then_crash)
        with pytest.raises(Crash):
            await write
        monkeypatch.setattr(store, "append_event", real_append)

    def now() -> datetime:
        return datetime.now(UTC)

    submit: dict[str, Any] = {
        "user_id": owner,
        "task_name": "record",
        "payload": {},
        "priority": Priority.NORMAL,
        "timeout_seconds": 30.0,
        "max_retries": 3,
        "project_id": project,
    }
    await broken(store.submit(db, now=now(), **submit))
    assert await store.list_jobs(db, owner) == JobPage([], 0)
    job = (await store.submit(db, now=now(), **submit)).job

    await broken(job_runs.claim(db, worker="w", now=now(), lease_seconds=0.01))
    loaded = await store.load_job(db, job.id)
    assert loaded is not None and loaded.status is JobStatus.QUEUED and loaded.attempts == []
    claimed = await job_runs.claim(db, worker="w", now=now(), lease_seconds=0.01)
    assert claimed is not None

    await broken(job_runs.complete(db, claimed, now=now(), result="x"))
    await broken(job_runs.reap_expired(db, now=now() + timedelta(seconds=1)))
    loaded = await store.load_job(db, job.id)
    assert loaded is not None and loaded.status is JobStatus.RUNNING
    assert "ended_at" not in loaded.attempts[-1]
    assert await job_log(db, project, job.id) == [Q, S]

    changed = await job_runs.complete(db, claimed, now=now(), result="x")
    assert changed is not None and pairs(changed.events) == [C]
    assert await job_log(db, project, job.id) == [Q, S, C]

    other = (await store.submit(db, now=now(), **submit)).job
    await broken(store.cancel(db, other.id, owner, now()))
    loaded = await store.load_job(db, other.id)
    assert loaded is not None and loaded.status is JobStatus.QUEUED
    await store.cancel(db, other.id, owner, now())
    await broken(store.retry(db, other.id, owner, now()))
    loaded = await store.load_job(db, other.id)
    assert loaded is not None and loaded.status is JobStatus.CANCELLED
    assert await job_log(db, project, other.id) == [Q, X]
