"""Tasks for the job tests, registered into the process's registry on import
(``JOB_TASK_MODULES=tests.job_tasks``, as a deployment would add its own)."""

from __future__ import annotations

from typing import Any

import trio
from pydantic import BaseModel, ConfigDict

from atrium.persistence.jobs import load_job
from atrium.tasks import PermanentJobError, TaskContext, registry


class BlockPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_attempts: int = 1000


@registry.task("test_block", BlockPayload)
async def block(ctx: TaskContext, payload: BlockPayload) -> dict[str, Any]:
    """Runs until cancelled during its first ``block_attempts`` attempts, then returns
    the attempt number (a job that hangs until its worker dies, then succeeds)."""
    await ctx.progress(1, f"attempt {ctx.attempt} started")
    if ctx.attempt <= payload.block_attempts:
        await trio.sleep_forever()
    return {"attempt": ctx.attempt}


class DeadFirstPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dead_attempts: int = 1


@registry.task("test_dead_first", DeadFirstPayload)
async def dead_first(ctx: TaskContext, payload: DeadFirstPayload) -> dict[str, Any]:
    """Goes dead at once (a "do not retry" error) in the first ``dead_attempts`` attempts
    of the job's life (retries by hand included), then returns that attempt's number: a
    dead job that a retry brings back."""
    job = await load_job(ctx.db, ctx.job_id)
    assert job is not None
    if job.attempt_count <= payload.dead_attempts:
        raise PermanentJobError(f"attempt {job.attempt_count} refused")
    return {"attempt": job.attempt_count}


class SizedResultPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chars: int = 10


@registry.task("test_sized_result", SizedResultPayload)
async def sized_result(ctx: TaskContext, payload: SizedResultPayload) -> dict[str, Any]:
    """Returns a result of about ``chars`` characters (``{"blob": "xx..."}``)."""
    return {"blob": "x" * payload.chars}
