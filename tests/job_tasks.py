"""Tasks for the job tests, registered into the process's registry on import
(``JOB_TASK_MODULES=tests.job_tasks``, as a deployment would add its own)."""

from __future__ import annotations

from typing import Any

import trio
from pydantic import BaseModel, ConfigDict

from atrium.tasks import TaskContext, registry


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
