"""The job engine against real PostgreSQL: queue, actors, leases, retries, supervision.

The queue's clock is trio's (a MockClock in the timing tests), so leases and backoff are
driven by ``mock_clock.jump`` instead of waiting.
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from atrium.core.jobs import Job, JobStatus, Priority
from atrium.core.roles import Role
from atrium.jobs import JobQueue, JobService, JobSettings, RetryPolicy, jobs_spec
from atrium.persistence import accounts, job_runs, projects
from atrium.persistence import jobs as store
from atrium.persistence.database import Database
from atrium.supervision import Supervisor, open_supervisor
from atrium.tasks import PermanentJobError, TaskContext, TaskRegistry
from atrium.tasks import registry as builtins

T0 = 1_800_000_000.0
WAIT = 10.0  # cap on any wait for a state (a real-time bound, never reached when passing)


class Empty(BaseModel):
    pass


class Rig:
    """Test tasks that record what ran, in a registry of their own."""

    def __init__(self) -> None:
        self.ran: list[uuid.UUID] = []
        self.started = trio.Event()
        self.release = trio.Event()
        self.registry = TaskRegistry()
        reg = self.registry

        @reg.task("record", Empty)
        async def record(ctx: TaskContext, payload: Empty) -> dict[str, Any]:
            """Note the job id."""
            self.ran.append(ctx.job_id)
            return {"attempt": ctx.attempt}

        @reg.task("fail", Empty)
        async def fail(ctx: TaskContext, payload: Empty) -> None:
            """Always fails."""
            raise RuntimeError(f"boom {ctx.attempt}")

        @reg.task("bad_input", Empty)
        async def bad_input(ctx: TaskContext, payload: Empty) -> None:
            """Fails for good."""
            raise PermanentJobError("the input can never work")

        @reg.task("hang", Empty)
        async def hang(ctx: TaskContext, payload: Empty) -> None:
            """Runs until released."""
            self.started.set()
            await ctx.progress(10, "waiting")
            await self.release.wait()

        @reg.task("wait_then_ok", Empty)
        async def wait_then_ok(ctx: TaskContext, payload: Empty) -> str:
            """Starts, waits to be released, then succeeds."""
            self.started.set()
            await self.release.wait()
            return "ok"


def trio_clock() -> float:
    return T0 + trio.current_time()


async def make_user(db: Database, name: str) -> uuid.UUID:
    user = await accounts.create_user(db, f"{name}-{uuid.uuid4().hex[:6]}@example.com", "x")
    assert user is not None
    return user.id


@asynccontextmanager
async def running_jobs(
    db: Database, registry: TaskRegistry, **overrides: Any
) -> AsyncIterator[tuple[JobQueue, JobService, Supervisor]]:
    options: dict[str, Any] = {
        "concurrency": 2,
        "lease_seconds": 30.0,
        "poll_seconds": 1.0,
        "drain_seconds": 1.0,
        "retention_days": 0,
        "retry": RetryPolicy(base=2.0, maximum=60.0, jitter=0.5, random=lambda: 0.5),
    }
    options.update(overrides)
    queue = JobQueue(
        JobSettings(**options), database=lambda: db, registry=registry, clock=trio_clock
    )
    async with open_supervisor(name="root") as root:
        if queue.settings.concurrency:
            await root.start_child(jobs_spec(queue))
        yield queue, JobService(queue), root


def jobs_tree(root: Supervisor) -> Supervisor:
    tree: Supervisor = root.child("jobs").value
    return tree


async def wait(queue: JobQueue, job_id: uuid.UUID, *statuses: JobStatus) -> Job:
    with trio.fail_after(WAIT):
        return await queue.wait_for(job_id, statuses)


async def test_data_processing_computes_real_statistics(db: Database) -> None:
    user = await make_user(db, "ann")
    csv = "city,temp,rain\nOslo,3.5,yes\nRome,18,no\nOslo,-1.5,yes\nLima,20,\n"
    async with running_jobs(db, builtins) as (queue, service, _):
        sub = await service.submit(user, task_name="data_processing", payload={"csv": csv})
        assert sub.created and sub.job.status is JobStatus.QUEUED
        job = await wait(queue, sub.job.id, JobStatus.COMPLETED)
    assert job.progress == 100
    assert job.result["rows"] == 4
    assert job.result["columns"] == ["city", "temp", "rain"]
    temp = job.result["stats"]["temp"]
    assert temp["type"] == "numeric"
    assert (temp["count"], temp["min"], temp["max"]) == (4, -1.5, 20.0)
    assert temp["mean"] == pytest.approx(10.0)
    assert temp["stddev"] == pytest.approx(statistics.pstdev([3.5, 18, -1.5, 20]))
    assert job.result["stats"]["city"] == {
        "type": "text",
        "count": 4,
        "distinct": 3,
        "values": {"Oslo": 2, "Rome": 1, "Lima": 1},
    }
    assert job.result["stats"]["rain"]["count"] == 3  # the empty cell is not a value
    assert job.attempts[0]["outcome"] == "completed"


async def test_malformed_csv_is_dead_at_once_with_a_clear_error(db: Database) -> None:
    user = await make_user(db, "ann")
    async with running_jobs(db, builtins) as (queue, service, _):
        sub = await service.submit(
            user, task_name="data_processing", payload={"csv": "a,b\n1,2\n3,4,5\n"}
        )
        job = await wait(queue, sub.job.id, JobStatus.DEAD)
    assert job.error == "malformed CSV: line 3 has 3 fields, the header has 2"
    assert job.attempt_count == 1  # "do not retry": no second attempt


async def test_project_export_and_activity_report(db: Database) -> None:
    owner = await make_user(db, "owner")
    other = await make_user(db, "other")
    project = (
        await projects.create_project(db, owner, name="P", description=None, visibility="private")
    ).value
    await projects.add_member(
        db, project.id, owner, role=Role.COLLABORATOR, user_id=other, email=None
    )
    await projects.update_project(db, project.id, other, {"name": "P2"})
    async with running_jobs(db, builtins, concurrency=0) as (_, service, _):
        export = await service.submit(
            owner, task_name="project_export", payload={}, project_id=project.id
        )
        report = await service.submit(
            owner, task_name="project_activity_report", payload={}, project_id=project.id
        )
    # One actor: the export runs first, then the report.
    async with running_jobs(db, builtins, concurrency=1) as (queue, _, _):
        exported = await wait(queue, export.job.id, JobStatus.COMPLETED)
        reported = await wait(queue, report.job.id, JobStatus.COMPLETED)
    doc = exported.result
    assert doc["project"]["name"] == "P2"
    assert {m["user_id"] for m in doc["members"]} == {str(owner), str(other)}
    # Both submissions were logged (JOB_QUEUED, in their transactions) before either ran;
    # the export's own JOB_STARTED committed with its claim, before it read the log.
    assert [e["type"] for e in doc["events"]] == [
        "PROJECT_CREATED",
        "MEMBER_ADDED",
        "PROJECT_UPDATED",
        "JOB_QUEUED",
        "JOB_QUEUED",
        "JOB_STARTED",
    ]
    assert doc["event_count"] == 6
    assert reported.result["total"] == 8
    assert reported.result["by_type"] == {
        "JOB_QUEUED": 2,
        "JOB_STARTED": 2,
        "JOB_COMPLETED": 1,
        "PROJECT_CREATED": 1,
        "MEMBER_ADDED": 1,
        "PROJECT_UPDATED": 1,
    }
    assert reported.result["by_user"] == {str(owner): 7, str(other): 1}
    assert reported.result["by_user_and_type"][str(other)] == {"PROJECT_UPDATED": 1}


async def test_retries_follow_the_backoff_schedule_then_dead(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, _):
        sub = await service.submit(user, task_name="fail", payload={}, max_retries=3)
        delays = []
        for attempt in (1, 2, 3):
            with trio.fail_after(WAIT):
                job = await queue.wait_until(
                    sub.job.id,
                    lambda j, n=attempt: j.attempt_count == n and j.status is JobStatus.FAILED,
                )
            ended = job.attempts[-1]["ended_at"]
            waited = job.next_attempt_at - store_time(ended)
            delays.append(waited.total_seconds())
            # Not due before its time: an early claim would have started another attempt.
            mock_clock.jump(waited.total_seconds())
            queue.wake()
        job = await wait(queue, sub.job.id, JobStatus.DEAD)
    # base 2 s doubling, times the jitter factor 1 - 0.5 * 0.5.
    assert delays == [1.5, 3.0, 6.0]
    assert [a["error"] for a in job.attempts] == [f"RuntimeError: boom {n}" for n in (1, 2, 3, 4)]
    assert [a["outcome"] for a in job.attempts] == ["failed", "failed", "failed", "dead"]
    for before, after in zip(job.attempts, job.attempts[1:], strict=False):
        gap = store_time(after["started_at"]) - store_time(before["ended_at"])
        assert gap >= timedelta(seconds=1.5)
    assert job.retry_count == 3 and job.error == "RuntimeError: boom 4"


def store_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_do_not_retry_error_is_dead_at_once(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry) as (queue, service, _):
        sub = await service.submit(user, task_name="bad_input", payload={}, max_retries=5)
        job = await wait(queue, sub.job.id, JobStatus.DEAD)
    assert job.attempt_count == 1 and job.error == "the input can never work"


async def test_timeout_stops_the_task(db: Database, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.rate = 1.0
    rig = Rig()
    user = await make_user(db, "ann")
    # A lease longer than the jump: heartbeats cannot keep up with a jumping clock.
    async with running_jobs(db, rig.registry, lease_seconds=600) as (queue, service, _):
        sub = await service.submit(
            user, task_name="hang", payload={}, timeout_seconds=20, max_retries=0
        )
        with trio.fail_after(WAIT):
            await rig.started.wait()
        # Jumps stay under the database layer's 30 s query timeout.
        mock_clock.jump(20)
        job = await wait(queue, sub.job.id, JobStatus.DEAD)
    assert job.error == "timed out after 20 s"


async def test_cancel_a_queued_and_a_running_job(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, _):
        running = await service.submit(user, task_name="hang", payload={})
        with trio.fail_after(WAIT):
            await rig.started.wait()
        queued = await service.submit(user, task_name="record", payload={})
        cancelled = await service.cancel(queued.job.id, user)
        assert cancelled.status is JobStatus.CANCELLED  # at once
        with trio.fail_after(1.0):  # the bound for a running job
            await service.cancel(running.job.id, user)
            job = await wait(queue, running.job.id, JobStatus.CANCELLED)
    assert job.attempts[-1]["outcome"] == "cancelled"
    assert rig.ran == []  # the queued one never ran


async def test_priority_then_age(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    # High priority is an owner's, for the project's jobs.
    owned = (
        await projects.create_project(db, user, name="P", description=None, visibility="private")
    ).value
    async with running_jobs(db, rig.registry, concurrency=0) as (_, service, _):
        low = await service.submit(user, task_name="record", payload={}, priority=Priority.LOW)
        normal1 = await service.submit(user, task_name="record", payload={})
        high = await service.submit(
            user, task_name="record", payload={}, priority=Priority.HIGH, project_id=owned.id
        )
        normal2 = await service.submit(user, task_name="record", payload={})
        # Places when each was submitted: the high one jumps the two queued before it.
        assert [j.position_in_queue for j in (low, normal1, high, normal2)] == [1, 1, 1, 3]
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, _, _):
        await wait(queue, low.job.id, JobStatus.COMPLETED)
    assert rig.ran == [high.job.id, normal1.job.id, normal2.job.id, low.job.id]


async def test_idempotency_key_returns_the_first_job(db: Database) -> None:
    rig = Rig()
    user, other = await make_user(db, "ann"), await make_user(db, "bob")
    async with running_jobs(db, rig.registry, concurrency=0) as (_, service, _):
        first = await service.submit(user, task_name="record", payload={}, idempotency_key="k1")
        again = await service.submit(user, task_name="record", payload={}, idempotency_key="k1")
        theirs = await service.submit(other, task_name="record", payload={}, idempotency_key="k1")
    assert first.created and not again.created and again.job.id == first.job.id
    assert theirs.created and theirs.job.id != first.job.id


async def test_many_actors_in_two_processes_run_every_job_exactly_once(db: Database) -> None:
    rig = Rig()
    users = [await make_user(db, name) for name in ("ann", "bob", "cy")]
    async with (
        running_jobs(db, rig.registry, concurrency=0) as (_, service, _),
    ):
        ids = [
            (await service.submit(users[n % 3], task_name="record", payload={})).job.id
            for n in range(300)
        ]
    # Two queues are two processes as far as the database can tell.
    async with (
        running_jobs(db, rig.registry, concurrency=4) as (queue, _, _),
        running_jobs(db, rig.registry, concurrency=4),
    ):
        with trio.fail_after(60):
            for job_id in ids:
                await queue.wait_for(job_id, {JobStatus.COMPLETED})
    counts = Counter(rig.ran)
    assert set(counts) == set(ids) and set(counts.values()) == {1}


async def test_expired_lease_is_reaped_and_the_attempt_counted(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=0) as (queue, service, _):
        sub = await service.submit(user, task_name="record", payload={})
        # A worker that claims the job and then dies without a word.
        lost = await job_runs.claim(db, worker="dead-worker", now=queue.now(), lease_seconds=10)
        assert lost is not None and lost.job.id == sub.job.id
    async with running_jobs(db, rig.registry, concurrency=1, lease_seconds=10) as (queue, _, _):
        mock_clock.jump(11)
        job = await wait(queue, sub.job.id, JobStatus.COMPLETED)
    assert job.attempt_count == 2 and job.retry_count == 1
    assert job.attempts[0]["outcome"] == "queued"
    assert "lease" in job.attempts[0]["error"]
    assert job.result == {"attempt": 2}
    # The dead worker's late write changes nothing.
    assert await job_runs.complete(db, lost, now=queue.now(), result="late") is None


async def test_actor_crash_outside_the_task_is_restarted_and_the_job_retried(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    real_complete = job_runs.complete
    calls = 0

    async def complete_once_broken(*args: Any, **kwargs: Any) -> Job | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the actor")
        return await real_complete(*args, **kwargs)

    monkeypatch.setattr(job_runs, "complete", complete_once_broken)
    async with running_jobs(
        db, rig.registry, concurrency=1, retry=RetryPolicy(base=0, jitter=0)
    ) as (queue, service, root):
        sub = await service.submit(user, task_name="record", payload={})
        job = await wait(queue, sub.job.id, JobStatus.COMPLETED)
        actor = jobs_tree(root).child("job_1")
        assert actor.restart_count == 1
        assert actor.last_failure is not None and actor.last_failure.type == "RuntimeError"
    assert [a["outcome"] for a in job.attempts] == ["failed", "completed"]
    assert job.attempts[0]["error"] == "job actor crashed: RuntimeError: a bug in the actor"


async def test_database_connections_dropped_mid_job(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, root):
        sub = await service.submit(user, task_name="wait_then_ok", payload={})
        with trio.fail_after(WAIT):
            await rig.started.wait()
        # Every other backend of this database goes away, the pool's included.
        await db.transaction(_terminate_other_backends)
        rig.release.set()
        job = await wait(queue, sub.job.id, JobStatus.COMPLETED)
        assert jobs_tree(root).child("job_1").restart_count == 0
    assert job.result == "ok" and job.attempt_count == 1


async def _terminate_other_backends(conn: Any) -> None:
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def test_stopping_releases_the_held_job_uncounted(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=1, drain_seconds=0.01) as (
        _,
        service,
        _,
    ):
        sub = await service.submit(user, task_name="hang", payload={})
        with trio.fail_after(WAIT):
            await rig.started.wait()
    job = await store.load_job(db, sub.job.id)
    assert job is not None and job.status is JobStatus.QUEUED
    assert job.attempt_count == 0 and job.attempts[-1]["outcome"] == "released"


async def test_supervisor_snapshot_shows_the_job_each_actor_holds(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=2) as (_, service, root):
        sub = await service.submit(user, task_name="hang", payload={})
        with trio.fail_after(WAIT):
            await rig.started.wait()
        tree = root.snapshot().to_dict()
        rig.release.set()
    jobs = next(c for c in tree["children"] if c["name"] == "jobs")["supervisor"]
    names = [c["name"] for c in jobs["children"]]
    assert names == ["job_workers", "job_1", "job_2", "job_reaper", "job_listener"]
    held = [c["detail"]["job_id"] for c in jobs["children"] if c["name"] in ("job_1", "job_2")]
    assert f"job_{sub.job.id}" in held


async def test_retention_prunes_finished_jobs_older_than_the_cutoff(db: Database) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, _):
        done = await service.submit(user, task_name="record", payload={})
        await wait(queue, done.job.id, JobStatus.COMPLETED)
    async with running_jobs(db, rig.registry, concurrency=0) as (queue, service, _):
        waiting = await service.submit(user, task_name="record", payload={})
        # Days later (by the queue's clock), the retention child's first pass at start.
        later = JobQueue(
            JobSettings(concurrency=1, retention_days=2),
            database=lambda: db,
            registry=rig.registry,
            clock=lambda: trio_clock() + 3 * 86400,
        )
        async with open_supervisor(name="later") as root:
            await root.start_child(jobs_spec(later))
            names = [c.name for c in jobs_tree(root).which_children()]
            assert names == ["job_workers", "job_1", "job_reaper", "job_listener", "job_retention"]
            await wait(later, waiting.job.id, JobStatus.COMPLETED)
            # The first pass runs beside the actor, which may finish its job first; a
            # deleted row sends no event to wait on.
            with trio.fail_after(WAIT):
                while await store.load_job(db, done.job.id) is not None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    assert await store.load_job(db, waiting.job.id) is not None  # finished just now


async def test_another_process_starts_a_submitted_job_without_waiting_for_a_poll(
    db: Database,
) -> None:
    rig = Rig()
    user = await make_user(db, "ann")
    # The worker polls once a minute: only the notification can wake it in time.
    async with (
        running_jobs(db, rig.registry, concurrency=1, poll_seconds=60) as (worker, _, _),
        running_jobs(db, rig.registry, concurrency=0) as (_, api, _),
    ):
        for _ in range(3):
            sub = await api.submit(user, task_name="record", payload={})
            with trio.fail_after(5):
                await worker.wait_for(sub.job.id, {JobStatus.COMPLETED})
