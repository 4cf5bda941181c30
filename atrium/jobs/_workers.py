"""The job worker processes: where CPU-heavy task steps run, killable and bounded.

A thread cannot be stopped: a timed-out job whose step ran in one kept burning CPU (and
the GIL) long after the job was ``dead``. Here such steps run in trio-parallel worker
processes instead; cancelling the step (timeout, cancel, release, lease lost) kills its
process. Each process runs at low priority and under an address-space limit, set in the
process itself when it starts.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import resource
from collections.abc import Callable
from functools import partial
from typing import Any, Self, TypeVar

import trio
import trio_parallel

from ..tasks import PermanentJobError

log = logging.getLogger("atrium.jobs")

T = TypeVar("T")

WORKER_NICE = 10
"""Worker processes' niceness: the event loop of the process that owns them keeps its core."""
# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def _init_worker(memory_bytes: int, nice: int) -> None:
    """Runs in each worker process before its first step."""
    # os.nice adds to the current value: reach at least ``nice``, never lower it.
    os.nice(max(0, nice - os.nice(0)))
    if memory_bytes > 0:
        # glibc reserves 64 MiB of address space per thread's malloc arena; Polars' threads
        # then reserved 1.1 GB to summarise a 1 MB CSV (119 MB resident). Two arenas: 390 MB.
        _limit_malloc_arenas(2)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _limit_malloc_arenas(arenas: int) -> None:
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator reserves what it reserves


class WorkerPool:
    """As many worker processes as job actors, owned by the ``jobs`` subtree (its
    ``job_workers`` child opens them; see :meth:`run`).

    ``run_sync(fn, *args)`` runs ``fn(*args)`` in a worker process; a cancel kills that
    process at once. Processes start on first use and are kept for the next step.
    """

    def __init__(self, processes: int, *, memory_mb: int, nice: int = WORKER_NICE) -> None:
        if processes < 1:
            raise ValueError("a worker pool needs at least one process")
        self.processes = processes
        self.memory_mb = memory_mb
        self.nice = nice
        # At most one step per process: a job never waits for a process while its
        # timeout runs, as long as each actor runs one step at a time.
        self._limiter = trio.CapacityLimiter(processes)
        self._context: trio_parallel.WorkerContext | None = None
        self._nursery: trio.Nursery | None = None
        self._running = trio.Event()
        self._opening = trio.Lock()
        self.steps = 0
        self.broken = 0

    def __repr__(self) -> str:
        return f"<WorkerPool processes={self.processes} memory_mb={self.memory_mb}>"

    def snapshot_detail(self) -> dict[str, Any]:
        """What ``/health/supervisor`` shows for the ``job_workers`` child."""
        context = self._context
        stats = None if context is None else context.statistics()
        return {
            "processes": self.processes,
            "memory_mb": self.memory_mb,
            "idle_workers": 0 if stats is None else stats.idle_workers,
            "running_workers": 0 if stats is None else stats.running_workers,
            "steps": self.steps,
            "workers_died": self.broken,
        }

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker processes until cancelled; then stop them (steps still running
        are the actors' to cancel: the ``jobs`` subtree stops its actors first). They are
        opened on the first step: a process that never runs one starts none, and its
        ``jobs`` subtree stops without waiting on trio-parallel's shutdown thread."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running.set()
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._running = trio.Event()

    async def _hold_context(self, *, task_status: trio.TaskStatus[None]) -> None:
        init = partial(_init_worker, self.memory_mb * 1024 * 1024, self.nice)
        # Workers fork from a server process that imported the main module and the tasks
        # once: a worker that replaces a killed one starts in 0.15 s, where a spawned one
        # imported everything again (0.6-1.2 s, counted in the next job's timeout).
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["__main__", "atrium.tasks"]
        )
        async with trio_parallel.open_worker_context(
            init=init, grace_period=5.0, worker_type=trio_parallel.WorkerType.FORKSERVER
        ) as context:
            self._context = context
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._context = None

    async def _open_context(self) -> trio_parallel.WorkerContext:
        async with self._opening:
            while self._context is None:
                await self._running.wait()
                if self._nursery is not None:
                    await self._nursery.start(self._hold_context)
            return self._context

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker process: its result, or what it raised. ``fn`` and the
        arguments travel by pickle, so ``fn`` must be an importable top-level function.

        Cancelling the call kills the process (its CPU use ends then). Raises
        PermanentJobError when the process died (the address-space limit, most likely)
        or ran out of memory: the same input would hit the same limit again."""
        context = self._context or await self._open_context()
        self.steps += 1
        try:
            result: T = await context.run_sync(
                fn, *args, kill_on_cancel=True, limiter=self._limiter
            )
            return result
        except trio_parallel.BrokenWorkerError as error:
            self.broken += 1
            process = error.args[-1] if error.args else None
            code = getattr(process, "exitcode", None)
            log.warning("a job worker process died (exit code %s)", code)
            raise PermanentJobError(
                f"the worker process died (exit code {code}) running {_name(fn)}; it may"
                f" have reached its memory limit (JOB_WORKER_MEMORY_MB={self.memory_mb})"
            ) from None
        except MemoryError:
            raise PermanentJobError(
                f"out of memory in {_name(fn)}: the worker process's limit is"
                f" JOB_WORKER_MEMORY_MB={self.memory_mb}"
            ) from None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
