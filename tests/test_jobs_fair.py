"""Fair queues (issue 19, item 6): one user's backlog does not hold up another user's job;
per-user running and queued limits hold across every process that claims."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

import asyncpg
import trio
import trio_asyncio
from conftest import StartServer
from test_jobs_api import auth, run, wait_status
from test_jobs_queue import WAIT, Empty, make_user, running_jobs

from atrium.core.jobs import JobStatus, QueueFull
from atrium.persistence import job_reports, job_runs
from atrium.persistence.database import Database
from atrium.tasks import TaskContext, TaskRegistry


class Gates:
    """A task whose jobs run until the test opens their gate, reporting each start."""

    def __init__(self) -> None:
        self.registry = TaskRegistry()
        self.gates: defaultdict[uuid.UUID, trio.Event] = defaultdict(trio.Event)
        self._send, self._started = trio.open_memory_channel[uuid.UUID](1000)

        @self.registry.task("gate", Empty)
        async def gate(ctx: TaskContext, payload: Empty) -> None:
            """Starts, then runs until its gate opens."""
            self._send.send_nowait(ctx.job_id)
            await self.gates[ctx.job_id].wait()

    async def next_started(self) -> uuid.UUID:
        with trio.fail_after(WAIT):
            return await self._started.receive()

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


async def running_of(db: Database, user_id: uuid.UUID) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM jobs WHERE user_id = $1 AND status = 'running'", user_id
    )
    return count


async def test_another_users_job_is_claimed_before_a_backlog(db: Database) -> None:
    gates = Gates()
    x, y = await make_user(db, "x"), await make_user(db, "y")
    async with running_jobs(db, gates.registry, concurrency=0) as (queue, service, _):
        backlog = [await service.submit(x, task_name="gate", payload={}) for _ in range(4)]
        theirs = await service.submit(y, task_name="gate", payload={})
    now = queue.now()
    claimed = [
        await job_runs.claim(db, worker="w", now=now, lease_seconds=30, max_running=None)
        for _ in range(3)
    ]
    # X's oldest first (both users run nothing), then Y's: X runs one job, Y none.
    assert [c.job.id for c in claimed if c is not None] == [
        backlog[0].job.id,
        theirs.job.id,
        backlog[1].job.id,
    ]


async def test_position_and_estimate_follow_the_fair_order(db: Database) -> None:
    gates = Gates()
    x, y = await make_user(db, "x"), await make_user(db, "y")
    async with running_jobs(db, gates.registry, concurrency=0) as (queue, service, _):
        backlog = [await service.submit(x, task_name="gate", payload={}) for _ in range(4)]
        theirs = await service.submit(y, task_name="gate", payload={})
        assert [s.position_in_queue for s in backlog] == [1, 2, 3, 4]
        # Y's job goes second, after X's oldest: not fifth, after X's whole backlog.
        assert theirs.position_in_queue == 2
        assert theirs.estimated_completion < backlog[-1].estimated_completion
        # X's jobs, seen now, are pushed back by one.
        places = [await job_reports.queue_position(db, s.job) for s in backlog]
        assert [p.position for p in places] == [1, 3, 4, 5]
        claimed = await job_runs.claim(db, worker="w", now=queue.now(), lease_seconds=30)
        assert claimed is not None and claimed.job.id == backlog[0].job.id
        # X runs one job now: Y's is next, then X's in their order.
        places = [await job_reports.queue_position(db, s.job) for s in (theirs, *backlog[1:])]
        assert [p.position for p in places] == [1, 2, 3, 4]
        assert (places[1].running, places[1].own_ahead) == (1, 0)


async def test_a_backlog_holds_up_another_users_job_for_one_job_at_most(db: Database) -> None:
    gates = Gates()
    x, y = await make_user(db, "x"), await make_user(db, "y")
    # X may run as many jobs as there are actors: Y must wait for one of them to end.
    async with running_jobs(db, gates.registry, concurrency=2, max_running_per_user=2) as (
        _,
        service,
        _,
    ):
        backlog = [(await service.submit(x, task_name="gate", payload={})).job.id for _ in range(5)]
        assert {await gates.next_started(), await gates.next_started()} == set(backlog[:2])
        theirs = (await service.submit(y, task_name="gate", payload={})).job.id
        gates.gates[backlog[0]].set()
        assert await gates.next_started() == theirs
        gates.open_all()


async def test_running_limit_holds_across_two_processes(db: Database) -> None:
    gates = Gates()
    x, y = await make_user(db, "x"), await make_user(db, "y")
    # Two queues are two processes; six actors, X may run two jobs.
    async with (
        running_jobs(db, gates.registry, concurrency=3, max_running_per_user=2) as (_, service, _),
        running_jobs(db, gates.registry, concurrency=3, max_running_per_user=2),
    ):
        backlog = [(await service.submit(x, task_name="gate", payload={})).job.id for _ in range(6)]
        # Which two of X's depends on the claims' race (a claim that lost a run slot to
        # another rolls back, and a later job of X's may be taken meanwhile).
        assert {await gates.next_started(), await gates.next_started()} < set(backlog)
        theirs = (await service.submit(y, task_name="gate", payload={})).job.id
        # Every idle actor of both processes looked again since; the next start is Y's.
        assert await gates.next_started() == theirs
        assert await running_of(db, x) == 2
        gates.open_all()


async def test_two_claims_at_once_cannot_pass_the_running_limit(
    db: Database, database_url: str
) -> None:
    gates = Gates()
    x = await make_user(db, "x")
    async with running_jobs(db, gates.registry, concurrency=0) as (queue, service, _):
        for _ in range(3):
            await service.submit(x, task_name="gate", payload={})
    now = queue.now()
    # Claimer A (another process) has claimed X's first job and not committed yet.
    conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
    try:
        held = conn.transaction()
        await trio_asyncio.aio_as_trio(held.start)()
        row = await trio_asyncio.aio_as_trio(conn.fetchrow)(
            job_runs._CLAIM,  # the claim's own statement, as A runs it
            now,
            uuid.uuid4(),
            "a",
            now + timedelta(seconds=30),
            "started",
            1,
            job_runs._CLAIM_LOCK,
        )
        assert row is not None
        result: list[Any] = []
        done = trio.Event()

        async def claimer_b() -> None:
            result.append(
                await job_runs.claim(db, worker="b", now=now, lease_seconds=30, max_running=1)
            )
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claimer_b)
            # B cannot see A's claim yet; it must wait on it, not take a second job (then
            # B is done at once). PostgreSQL tells of a wait only when asked: look often.
            with trio.fail_after(WAIT):
                while not done.is_set() and not await _waiting_on_a_lock(db):
                    with trio.move_on_after(0.01):
                        await done.wait()
            await trio_asyncio.aio_as_trio(held.commit)()
    finally:
        await trio_asyncio.aio_as_trio(conn.close)()
    assert result == [None]
    assert await running_of(db, x) == 1


async def _waiting_on_a_lock(db: Database) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def test_queued_limit_holds_for_submissions_at_once(db: Database) -> None:
    gates = Gates()
    x = await make_user(db, "x")
    async with running_jobs(db, gates.registry, concurrency=0, max_queued_per_user=3) as (
        _,
        service,
        _,
    ):
        outcomes: list[str] = []

        async def submit() -> None:
            try:
                await service.submit(x, task_name="gate", payload={})
                outcomes.append("queued")
            except QueueFull:
                outcomes.append("refused")

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(submit)
    assert sorted(outcomes) == ["queued"] * 3 + ["refused"] * 5
    waiting = await db.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", x)
    assert waiting == 3  # a refused submission leaves no row


async def test_queued_limit_answers_429_with_retry_after(start_server: StartServer) -> None:
    async with start_server(WORKER_CONCURRENCY=0, JOB_MAX_QUEUED_PER_USER=2) as server:
        ann = auth(await server.signup_login("ann@example.com"))
        bob = auth(await server.signup_login("bob@example.com"))
        body = {"task_name": "data_processing", "payload": {"csv": "a\n1\n"}}
        first = await run(server, ann, **body, idempotency_key="one")
        assert first.status_code == 202, first.text
        assert (await run(server, ann, **body)).status_code == 202
        refused = await run(server, ann, **body)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "job_queue_full"
        assert "JOB_MAX_QUEUED_PER_USER" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        # The limit is per user; a repeated key still answers with the first job.
        assert (await run(server, bob, **body)).status_code == 202
        again = await run(server, ann, **body, idempotency_key="one")
        assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
        # A cancelled job leaves the queue, and makes room.
        job_id = first.json()["job_id"]
        r = await server.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ann)
        assert r.status_code == 200, r.text
        assert (await run(server, ann, **body)).status_code == 202


async def test_a_small_job_is_not_stuck_behind_another_users_wide_csv_backlog(
    start_server: StartServer,
) -> None:
    """The issue's row: user X submits four heavy jobs, then user Y a one-line CSV; Y's job
    took 73.7 s. X's jobs here block until cancelled: before fair queues, Y's waited for
    ever behind them."""
    async with start_server(WORKER_CONCURRENCY=3, JOB_TASK_MODULES="tests.job_tasks") as server:
        x = auth(await server.signup_login("x@example.com"))
        y = auth(await server.signup_login("y@example.com"))
        backlog = []
        for _ in range(4):
            r = await run(server, x, task_name="test_block", payload={})
            assert r.status_code == 202, r.text
            backlog.append(r.json()["job_id"])

        async def statuses() -> list[str]:
            found = []
            for job_id in backlog:
                status = await server.client.get(f"/api/v1/jobs/{job_id}/status", headers=x)
                found.append(status.json()["status"])
            return sorted(found)

        # Two of X's run (JOB_MAX_RUNNING_PER_USER); a third actor stays free. Which two
        # depends on the claims' race, and a job's start sends no event to this client.
        with trio.fail_after(WAIT):
            while await statuses() != ["queued", "queued", "running", "running"]:  # noqa: ASYNC110
                await trio.sleep(0.02)
        r = await run(server, y, task_name="data_processing", payload={"csv": "a\n1\n"})
        assert r.status_code == 202, r.text
        # Next in the queue (0: the free actor took it before the answer was written).
        assert r.json()["position_in_queue"] in (0, 1)
        await wait_status(server, r.json()["job_id"], JobStatus.COMPLETED)
        # X still runs two; the rest wait.
        assert await statuses() == ["queued", "queued", "running", "running"]
        for job_id in backlog:
            await server.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=x)
