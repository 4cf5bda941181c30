"""``python run.py worker`` as real processes: SIGKILL mid-job, then SIGTERM mid-job; a
timed-out or cancelled job's CPU, measured from outside.

A worker killed with SIGKILL stops renewing its lease; another worker's reaper takes the
job back (the attempt counted) and runs it to completion. A worker stopped with SIGTERM
hands its job back to the queue without counting an attempt. A job whose CPU-heavy step
times out or is cancelled stops using CPU (the worker and all its child processes) within
a second. Waits follow the workers' own log lines or the job's row, never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from atrium.core.jobs import JobStatus
from atrium.jobs import JobQueue, JobService, JobSettings
from atrium.persistence import accounts
from atrium.persistence import jobs as store
from atrium.persistence.database import Database
from atrium.tasks import load_task_modules

ROOT = Path(__file__).resolve().parent.parent
LEASE = 1.5  # seconds: short, so the killed worker's lease expires quickly


class Worker:
    """A ``run.py worker`` subprocess whose log we can wait on, line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.lines: list[str] = []

    async def wait_for_line(self, text: str) -> str:
        """The first log line (from now on or already read) containing ``text``."""
        for line in self.lines:
            if text in line:
                return line
        assert self.process.stderr is not None
        with trio.fail_after(60):
            while True:
                chunk = await self.process.stderr.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"worker exited before logging {text!r}")
                self._buffer += chunk
                *complete, self._buffer = self._buffer.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    self.lines.append(line)
                    if text in line:
                        return line

    async def drain(self) -> None:
        assert self.process.stderr is not None
        async for _ in self.process.stderr:
            pass


async def start_worker(tmp_path: Path, database_url: str, name: str) -> Worker:
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "SECRET_KEY")}
    env.update(
        DATA_DIR=str(tmp_path / name),
        DATABASE_URL=database_url,
        WORKER_CONCURRENCY="1",
        METRICS_PORT="0",
        JOB_LEASE_SECONDS=str(LEASE),
        JOB_TASK_MODULES="tests.job_tasks",
        LOG_LEVEL="INFO",
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, str(ROOT / "run.py"), "worker"],
        env=env,
        cwd=str(ROOT),
        stdout=None,
        stderr=subprocess.PIPE,
    )
    return Worker(process)


async def test_killed_worker_job_completes_elsewhere_and_sigterm_releases(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    user = await accounts.create_user(db, "ann@example.com", "x")
    assert user is not None
    load_task_modules(("tests.job_tasks",))  # the submitter validates against the task
    service = JobService(JobQueue(JobSettings(concurrency=0), database=lambda: db))
    submitted = await service.submit(
        user.id, task_name="test_block", payload={"block_attempts": 1}, max_retries=3
    )
    job_id = submitted.job.id

    first = await start_worker(tmp_path, database_url, "a")
    await first.wait_for_line(f"started job {job_id}")
    first.process.send_signal(signal.SIGKILL)
    assert await first.process.wait() == -signal.SIGKILL

    second = await start_worker(tmp_path, database_url, "b")
    try:
        await second.wait_for_line(f"job {job_id} completed")
        job = await store.load_job(db, job_id)
        assert job is not None and job.status is JobStatus.COMPLETED
        assert job.attempt_count == 2 and job.retry_count == 1  # the lost attempt counted
        assert job.result == {"attempt": 2}
        lost, done = job.attempts
        assert lost["outcome"] == "queued" and "lease" in lost["error"]
        assert done["outcome"] == "completed" and lost["worker"] != done["worker"]

        held = await service.submit(user.id, task_name="test_block", payload={})
        await second.wait_for_line(f"started job {held.job.id}")
        second.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second.drain)
                assert await second.process.wait() == 0
    finally:
        if second.process.returncode is None:
            second.process.kill()
    released = await store.load_job(db, held.job.id)
    assert released is not None and released.status is JobStatus.QUEUED
    assert released.attempt_count == 0 and released.attempts[-1]["outcome"] == "released"


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` and every process under it, the ones already reaped
    included (utime + stime + cutime + cstime in /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0  # exited between the listing and the read: its time is its parent's
    fields = stat.rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    total = ticks / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(cpu_seconds(int(child)) for child in task.read_text().split())
    return total


async def cpu_over(pid: int, seconds: float) -> float:
    """The CPU the process tree of ``pid`` uses in the next ``seconds`` (a measurement
    window, not a wait for something)."""
    before = cpu_seconds(pid)
    await trio.sleep(seconds)
    return cpu_seconds(pid) - before


async def wait_for_cpu(pid: int, seconds: float) -> None:
    """Wait until the process tree of ``pid`` has used ``seconds`` more CPU."""
    until = cpu_seconds(pid) + seconds
    with trio.fail_after(30):
        # CPU time has no event to wait on: read it until it has grown.
        while cpu_seconds(pid) < until:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_a_timed_out_or_cancelled_job_stops_using_cpu_within_a_second(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    user = await accounts.create_user(db, "ann@example.com", "x")
    assert user is not None
    load_task_modules(("tests.job_tasks",))
    queue = JobQueue(JobSettings(concurrency=0, poll_seconds=0.1), database=lambda: db)
    service = JobService(queue)
    worker = await start_worker(tmp_path, database_url, "cpu")
    pid = worker.process.pid
    try:
        timed = await service.submit(
            user.id, task_name="test_spin", payload={}, timeout_seconds=3.0, max_retries=0
        )
        await worker.wait_for_line(f"started job {timed.job.id}")
        await wait_for_cpu(pid, 0.5)  # the step spins (in a process started for it)
        with trio.fail_after(30):
            job = await queue.wait_for(timed.job.id, [JobStatus.DEAD])
        assert job.error == "timed out after 3 s"
        await trio.sleep(1.0)  # "within a second"
        assert await cpu_over(pid, 1.0) < 0.2  # an idle worker, no spinning step

        cancelled = await service.submit(user.id, task_name="test_spin", payload={})
        await worker.wait_for_line(f"started job {cancelled.job.id}")
        await wait_for_cpu(pid, 0.5)
        await service.cancel(cancelled.job.id, user.id)
        with trio.fail_after(30):
            await queue.wait_for(cancelled.job.id, [JobStatus.CANCELLED])
        await trio.sleep(1.0)
        assert await cpu_over(pid, 1.0) < 0.2
    finally:
        worker.process.kill()
        with trio.CancelScope(shield=True):
            await worker.process.wait()
