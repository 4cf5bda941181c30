"""Tasks for the job tests, registered into the process's registry on import
(``JOB_TASK_MODULES=tests.job_tasks``, as a deployment would add its own)."""

from __future__ import annotations

import time
from typing import Any

import polars
import trio
from pydantic import BaseModel, ConfigDict

from atrium.persistence.jobs import load_job
from atrium.tasks import PermanentJobError, TaskContext, registry
from atrium.tasks._csv import summarise_csv
from tests import csv_reference


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


# CPU-heavy steps for the worker-process tests: importable top-level functions, as
# ctx.run_sync requires (they are pickled to the worker process by name).


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds`` (a step that only a kill stops early)."""
    end = time.process_time() + seconds
    turns = 0
    while time.process_time() < end:
        turns += 1
    return turns


def summarise_for(text: str, seconds: float) -> int:
    """Summarise ``text`` with data_processing's Polars code and with the pure-Python code
    it replaced (which holds the GIL throughout, as a plugin's Python code would), again
    and again for ``seconds`` of wall time: a heavy CSV job from a small payload."""
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        summarise_csv(text, None)
        csv_reference.summarise_csv(text, None)
        rounds += 1
    return rounds


def hog(how: str) -> None:
    """Reach past the worker process's address-space limit: Polars aborts the process
    (``abort``), Python raises MemoryError (``python``)."""
    if how == "abort":
        polars.zeros(1 << 30, eager=True)  # 8 GiB
    else:
        bytearray(1 << 33)


class SpinPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 60.0


@registry.task("test_spin", SpinPayload)
async def spin_task(ctx: TaskContext, payload: SpinPayload) -> dict[str, Any]:
    """Burns CPU in a worker process for ``seconds``."""
    await ctx.progress(1, "spinning")
    return {"turns": await ctx.run_sync(spin, payload.seconds)}


class HeavyCsvPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csv: str
    seconds: float


@registry.task("test_heavy_csv", HeavyCsvPayload)
async def heavy_csv(ctx: TaskContext, payload: HeavyCsvPayload) -> dict[str, Any]:
    """Summarises ``csv`` in a worker process, again and again for ``seconds``, once the
    process has started (reported as progress ``warm``)."""
    await ctx.run_sync(len, "")  # the process starts: its imports run before its nice 10
    await ctx.progress(1, "warm")
    return {"rounds": await ctx.run_sync(summarise_for, payload.csv, payload.seconds)}


class HogPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str = "abort"


@registry.task("test_hog", HogPayload)
async def hog_task(ctx: TaskContext, payload: HogPayload) -> None:
    """Allocates past the worker process's memory limit."""
    await ctx.run_sync(hog, payload.how)
