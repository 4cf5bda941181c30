"""The job actor: claims due jobs one at a time and runs each attempt in its own scope."""

from __future__ import annotations

import enum
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self

import trio

from ..core.jobs import Job, JobStatus
from ..core.logs import log_context
from ..persistence import job_runs
from ..persistence.database import DatabaseUnavailable
from ..persistence.job_runs import Claimed
from ..persistence.jobs import Changed
from ..tasks import PermanentJobError, TaskContext, UnknownTask
from ._queue import JobQueue
from ._workers import WorkerPool

log = logging.getLogger("atrium.jobs")

# Backoff while the database is away: weather, waited out here, never a crash.
_WEATHER_MIN = 0.1
_WEATHER_MAX = 5.0
_HOST = socket.gethostname()


class _Stop(enum.Enum):
    """Why a running task's scope was cancelled by someone other than its deadline."""

    CANCEL = "cancel"  # a user asked
    RELEASE = "release"  # this actor is stopping
    LEASE_LOST = "lease_lost"  # the reaper took the job back


class _LatestProgress:
    """A running attempt's latest progress report. Reports only overwrite it; a sender
    writes and publishes it at most once per ``progress_interval`` (the latest wins,
    repeats are dropped), whatever the task reports."""

    def __init__(self) -> None:
        self._latest: tuple[int, str | None] | None = None
        self._sent: tuple[int, str | None] | None = None
        self._reported = trio.Event()
        self.writing = trio.Lock()
        """Held to take and write a report: writes land in the order they were taken."""

    def report(self, percent: int, message: str | None) -> None:
        self._latest = (percent, message)
        self._reported.set()

    def take_unsent(self) -> tuple[int, str | None] | None:
        """The latest report if it was not sent yet (then it counts as sent)."""
        if self._latest is None or self._latest == self._sent:
            return None
        self._sent = self._latest
        return self._latest

    async def wait_reported(self) -> None:
        """Until the task reports (again)."""
        await self._reported.wait()
        self._reported = trio.Event()


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: JobStatus  # completed, failed (then retry or dead by policy), dead, cancelled
    result: Any = None
    error: str | None = None
    released: bool = False
    lease_lost: bool = False


class JobActor:
    """Runs jobs from the queue until asked to stop; one attempt at a time.

    Failure boundaries: an exception from a task is that attempt's failure (recorded,
    retried by the policy); a database outage is waited out with backoff; anything else
    is a bug in the actor itself: it records the held attempt as failed (best effort)
    and crashes, and its supervisor starts a fresh one.

    ``request_stop()`` (graceful): no new claims; the running job gets
    ``drain_seconds`` to finish, then is released back to ``queued`` without counting
    the attempt.

    CPU-heavy steps of a task (``ctx.run_sync``) run in ``workers``, the processes of
    the ``jobs`` subtree: when the attempt's scope is cancelled, the step's process is
    killed with it.
    """

    def __init__(self, queue: JobQueue, name: str, workers: WorkerPool) -> None:
        self.queue = queue
        self.name = name
        self.workers = workers
        self.worker = f"{_HOST}:{os.getpid()}:{name}"
        self._held: Claimed | None = None
        self._task_scope: trio.CancelScope | None = None
        self._stop_reason: _Stop | None = None
        self._stopping = False
        self._idle: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._completed = 0

    def __repr__(self) -> str:
        return f"<JobActor {self.name!r}>"

    @property
    def holding(self) -> uuid.UUID | None:
        """The job this actor runs now, if any."""
        return None if self._held is None else self._held.job.id

    def snapshot_detail(self) -> dict[str, Any]:
        """What ``/health/supervisor`` shows for this child."""
        held = self._held
        return {
            "job_id": None if held is None else f"job_{held.job.id}",
            "task_name": None if held is None else held.job.task_name,
            "jobs_finished": self._completed,
        }

    def request_stop(self) -> None:
        """Stop claiming; let the running job finish within ``drain_seconds``, then
        release it. Returns at once."""
        if self._stopping:
            return
        self._stopping = True
        if self._idle is not None:
            self._idle.cancel()
        if self._held is not None and self._nursery is not None:
            self._nursery.start_soon(self._release_after, self.queue.settings.drain_seconds)

    def cancel_job(self, job_id: uuid.UUID) -> None:
        """Stop the task of ``job_id`` now, if it is the one this actor runs."""
        if self.holding == job_id:
            self._interrupt(_Stop.CANCEL)

    def _interrupt(self, reason: _Stop) -> None:
        if self._task_scope is not None and self._stop_reason is None:
            self._stop_reason = reason
            self._task_scope.cancel()

    async def _release_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._interrupt(_Stop.RELEASE)

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim and run jobs until stopped. Raises only for the actor's own faults."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            try:
                await self._loop()
            except Exception as crash:
                # Raised outside the nursery: the supervisor sees the error itself, not an
                # ExceptionGroup around it.
                failure = crash
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _loop(self) -> None:
        weather = 0.0
        settings = self.queue.settings
        while not self._stopping:
            wakeup = self.queue.wakeup()
            try:
                claimed = await job_runs.claim(
                    self.queue.db,
                    worker=self.worker,
                    now=self.queue.now(),
                    lease_seconds=settings.lease_seconds,
                    max_running=settings.max_running_per_user,
                )
            except DatabaseUnavailable as error:
                weather = min(_WEATHER_MAX, max(_WEATHER_MIN, weather * 2))
                log.warning("%s: cannot claim (%s); again in %.1fs", self.name, error, weather)
                await self._idle_wait(weather, None)
                continue
            weather = 0.0
            if claimed is None:
                await self._idle_wait(settings.poll_seconds, wakeup)
                continue
            await self._run_job(claimed)

    async def _idle_wait(self, seconds: float, wakeup: trio.Event | None) -> None:
        with trio.CancelScope() as self._idle, trio.move_on_after(seconds):
            if self._stopping:
                return
            if wakeup is None:
                await trio.sleep_forever()
            await wakeup.wait()
        self._idle = None

    async def _run_job(self, claimed: Claimed) -> None:
        job = claimed.job
        # Every line about this attempt, the task's own included, carries these.
        with log_context(job_id=f"job_{job.id}", attempt=job.attempt_count, task=job.task_name):
            await self._hold(claimed)

    async def _hold(self, claimed: Claimed) -> None:
        """Run the claimed job's attempt and record its outcome."""
        job = claimed.job
        self._held = claimed
        self._stop_reason = None
        self.queue.register(job.id, self)
        try:
            log.info(
                "%s: started job %s (%s, attempt %d)",
                self.name,
                job.id,
                job.task_name,
                job.attempt_count,
            )
            await self.queue.changed(claimed)
            started = trio.current_time()
            try:
                outcome = await self._attempt(claimed)
            except Exception:
                raise  # the actor's own fault: below
            except BaseException:
                # Cancelled from outside (a forced stop; trio may wrap it in a group): hand
                # the job back uncounted.
                with trio.move_on_after(2.0, shield=True):
                    await self._record(claimed, _Outcome(JobStatus.QUEUED, released=True))
                raise
            self._count(job, outcome, trio.current_time() - started)
            await self._record(claimed, outcome)
        except Exception as crash:
            # The actor's own fault, not the task's: the attempt fails by the policy, then
            # the actor crashes and its supervisor starts a fresh one.
            await self._record_crash(claimed, crash)
            raise
        finally:
            self.queue.unregister(job.id)
            self._held = None
            self._task_scope = None

    def _count(self, job: Job, outcome: _Outcome, seconds: float) -> None:
        metrics = self.queue.metrics
        # Only registered names: any string can be submitted, and each would be a series.
        task = job.task_name if job.task_name in self.queue.registry else "unknown"
        if outcome.released:
            result = "released"
        elif outcome.lease_lost:
            result = "lease_lost"
        else:
            result = str(outcome.status)
        metrics.job_attempts.labels(task, result).inc()
        metrics.job_seconds.labels(task).observe(seconds)

    async def _attempt(self, claimed: Claimed) -> _Outcome:
        job = claimed.job
        # The creator's rights now, not at submission: a creator removed from the project
        # or demoted since then ends the job here, before the task reads anything.
        try:
            refusal = await job_runs.run_refusal(self.queue.db, job)
        except DatabaseUnavailable:
            return _Outcome(JobStatus.QUEUED, released=True)  # claimed again once it is back
        if refusal is not None:
            return _Outcome(JobStatus.DEAD, error=refusal)
        try:
            task = self.queue.registry.get(job.task_name)
        except UnknownTask:
            return _Outcome(JobStatus.DEAD, error=f"unknown task {job.task_name!r}")
        scope = trio.CancelScope(deadline=trio.current_time() + job.timeout_seconds)
        self._task_scope = scope
        if job.cancel_requested:
            self._interrupt(_Stop.CANCEL)
        if self._stopping and self._nursery is not None:
            self._nursery.start_soon(self._release_after, self.queue.settings.drain_seconds)
        outcome: _Outcome | None = None
        progress = _LatestProgress()
        async with trio.open_nursery() as beats:
            beats.start_soon(self._heartbeat, claimed)
            beats.start_soon(self._send_progress, claimed, progress)
            with scope:
                try:
                    payload = task.payload.model_validate(job.payload)
                    ctx = TaskContext(
                        job_id=job.id,
                        user_id=job.user_id,
                        project_id=job.project_id,
                        attempt=job.attempt_count - job.budget_from,
                        db=self.queue.db,
                        report=progress.report,
                        run_sync=self.workers.run_sync,
                    )
                    result = await task.run(ctx, payload)
                    # The task's last word (its final message) is kept, not coalesced away.
                    await self._flush_progress(claimed, progress)
                    outcome = _Outcome(JobStatus.COMPLETED, result=result)
                except PermanentJobError as error:
                    outcome = _Outcome(JobStatus.DEAD, error=str(error) or type(error).__name__)
                except Exception as error:
                    # The attempt's failure boundary: the task's fault, never the actor's.
                    log.warning("%s: job %s attempt failed", self.name, job.id, exc_info=error)
                    outcome = _Outcome(JobStatus.FAILED, error=f"{type(error).__name__}: {error}")
            beats.cancel_scope.cancel()
        if scope.cancelled_caught or outcome is None:
            reason = self._stop_reason
            if reason is _Stop.CANCEL:
                return _Outcome(JobStatus.CANCELLED, error="cancelled")
            if reason is _Stop.RELEASE:
                return _Outcome(JobStatus.QUEUED, released=True)
            if reason is _Stop.LEASE_LOST:
                return _Outcome(JobStatus.RUNNING, lease_lost=True)
            return _Outcome(JobStatus.FAILED, error=f"timed out after {job.timeout_seconds:g} s")
        return outcome

    async def _heartbeat(self, claimed: Claimed) -> None:
        settings = self.queue.settings
        while True:
            await trio.sleep(settings.heartbeat_seconds)
            try:
                cancel = await job_runs.heartbeat(
                    self.queue.db,
                    claimed,
                    now=self.queue.now(),
                    lease_seconds=settings.lease_seconds,
                )
            except DatabaseUnavailable as error:
                log.warning("%s: lease renewal failed (%s)", self.name, error)
                continue
            if cancel is None:
                log.warning("%s: lost the lease of job %s", self.name, claimed.job.id)
                self._interrupt(_Stop.LEASE_LOST)
                return
            if cancel:
                self._interrupt(_Stop.CANCEL)

    async def _send_progress(self, claimed: Claimed, progress: _LatestProgress) -> None:
        """Write and publish the attempt's progress: the first report at once, then the
        latest at most once per ``progress_interval``. A 3,000-column CSV reporting each
        column costs a few row writes and frames, not 3,000."""
        interval = self.queue.settings.progress_interval
        while True:
            await progress.wait_reported()
            await self._flush_progress(claimed, progress)
            await trio.sleep(interval)

    async def _flush_progress(self, claimed: Claimed, progress: _LatestProgress) -> None:
        async with progress.writing:
            if (latest := progress.take_unsent()) is not None:
                await self._write_progress(claimed, *latest)

    async def _write_progress(self, claimed: Claimed, percent: int, message: str | None) -> None:
        try:
            await job_runs.set_progress(self.queue.db, claimed, percent, message)
        except DatabaseUnavailable:
            return  # progress is advisory; the outcome is what must be written
        await self.queue.progressed(claimed.job, percent, message)

    async def _record(self, claimed: Claimed, outcome: _Outcome) -> None:
        """Write the attempt's outcome, waiting out a database outage for as long as the
        lease would have lasted (after that the reaper owns the job)."""
        if outcome.lease_lost:
            return
        job = claimed.job
        give_up = trio.current_time() + self.queue.settings.lease_seconds
        delay = _WEATHER_MIN
        while True:
            try:
                with trio.CancelScope(shield=True):
                    written = await self._write(claimed, outcome)
                break
            except DatabaseUnavailable as error:
                if trio.current_time() + delay > give_up:
                    log.error("%s: could not record job %s (%s)", self.name, job.id, error)
                    return
                await trio.sleep(delay)
                delay = min(_WEATHER_MAX, delay * 2)
        if written is not None:
            self._completed += 1
            log.info("%s: job %s %s", self.name, job.id, written.job.status)
            await self.queue.changed(written)
            if written.job.status is JobStatus.QUEUED:
                self.queue.wake()

    async def _write(self, claimed: Claimed, outcome: _Outcome) -> Changed | None:
        db, now = self.queue.db, self.queue.now()
        if outcome.released:
            return await job_runs.release(db, claimed, now=now)
        if outcome.status is JobStatus.COMPLETED:
            return await job_runs.complete(
                db,
                claimed,
                now=now,
                result=outcome.result,
                max_result_bytes=self.queue.settings.max_result_bytes,
            )
        if outcome.status is JobStatus.CANCELLED:
            return await job_runs.finish_cancelled(db, claimed, now=now)
        error = outcome.error or "failed"
        retry_at = None
        job = claimed.job
        if outcome.status is JobStatus.FAILED and job.retries_left > 0:
            failures = job.attempt_count - job.budget_from
            retry_at = now + timedelta(seconds=self.queue.settings.retry.delay(failures))
        return await job_runs.fail(db, claimed, now=now, error=error, retry_at=retry_at)

    async def _record_crash(self, claimed: Claimed, crash: Exception) -> None:
        error = f"job actor crashed: {type(crash).__name__}: {crash}"
        outcome = _Outcome(JobStatus.FAILED, error=error)
        with trio.move_on_after(5.0, shield=True):
            try:
                written = await self._write(claimed, outcome)
            except Exception:
                log.exception("%s: could not record the crash of job %s", self.name, claimed.job.id)
                return
            if written is not None:
                await self.queue.changed(written)
