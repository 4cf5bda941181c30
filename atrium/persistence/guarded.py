"""A server run under the guard process (``_pg_guard.py``): the embedded PostgreSQL
(``embedded.py``) and the embedded Redis (``embedded_redis.py``) start, wait and stop
through :func:`run_guarded`, so both keep the same promises (watched, never outliving
atrium)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import trio

log = logging.getLogger("atrium.embedded")

GUARD = Path(__file__).with_name("_pg_guard.py")
STOP_TIMEOUT = 40.0  # the guard's fast then immediate shutdown take at most 30 s


async def run_guarded(
    command: Sequence[str],
    *,
    name: str,
    ready: Callable[[int], Awaitable[bool]],
    start_timeout: float,
    poll: float,
    log_path: Path,
    start_error: type[Exception],
    exit_error: type[Exception],
    up: str,
    started: str,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Start the guard ``command`` (its own session, so Ctrl-C reaches atrium, which then
    stops the server), poll ``ready(guard_pid)`` every ``poll`` seconds, log ``up`` and
    report ``started`` once it is true, then run until the guard ends.

    Raises ``start_error`` when the guard exits while starting or the server is not ready
    within ``start_timeout`` seconds, and ``exit_error`` when it ends after starting
    (``name`` begins each message). However it ends, cancelled too, the guard is stopped
    (shielded): its pipe is closed, then it is killed after STOP_TIMEOUT.
    """
    guard = await trio.lowlevel.open_process(
        list(command), stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        with trio.move_on_after(start_timeout) as starting:
            while not await ready(guard.pid):
                if guard.poll() is not None:
                    raise start_error(
                        f"{name} exited while starting (status {guard.returncode}); see {log_path}"
                    )
                await trio.sleep(poll)
        if starting.cancelled_caught:
            raise start_error(f"{name} did not start within {start_timeout} s")
        log.info("%s (guard %d)", up, guard.pid)
        task_status.started(started)
        status = await guard.wait()
        raise exit_error(f"{name} exited with status {status}")
    finally:
        with trio.CancelScope(shield=True):
            await stop_guard(guard)


async def stop_guard(guard: trio.Process) -> None:
    """Close the guard's pipe (it then stops its server) and wait for it to end; kill it
    after STOP_TIMEOUT."""
    if guard.stdin is not None:
        await guard.stdin.aclose()
    with trio.move_on_after(STOP_TIMEOUT):
        await guard.wait()
        return
    guard.kill()
    await guard.wait()
