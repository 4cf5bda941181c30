"""``run_guarded``: what the embedded PostgreSQL and Redis share (each is also tested whole:
tests/test_outage.py, tests/test_workers.py). Here the "guard" is a small Python process."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from atrium.persistence.guarded import run_guarded


class StartError(Exception):
    pass


class ExitError(Exception):
    pass


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def options(**overrides: Any) -> dict[str, Any]:
    async def ready(guard_pid: int) -> bool:
        return True

    values: dict[str, Any] = dict(
        name="thing",
        ready=ready,
        start_timeout=10.0,
        poll=0.01,
        log_path=Path("/var/log/thing"),
        start_error=StartError,
        exit_error=ExitError,
        up="thing is up",
        started="thing://here",
    )
    values.update(overrides)
    return values


async def test_a_guard_that_exits_while_starting_raises_the_start_error() -> None:
    async def never(guard_pid: int) -> bool:
        return False

    with trio.fail_after(10), pytest.raises(StartError) as raised:
        await run_guarded(python("raise SystemExit(2)"), **options(ready=never))
    assert str(raised.value) == "thing exited while starting (status 2); see /var/log/thing"


async def test_a_server_not_ready_in_time_raises_the_start_error_and_is_stopped(
    autojump_clock: MockClock,
) -> None:
    pids: list[int] = []

    async def never(guard_pid: int) -> bool:
        pids.append(guard_pid)
        return False

    with pytest.raises(StartError) as raised:
        await run_guarded(
            python("import sys; sys.stdin.read()"), **options(ready=never, start_timeout=0.5)
        )
    assert str(raised.value) == "thing did not start within 0.5 s"
    with pytest.raises(ProcessLookupError):  # stopped (its pipe closed) and reaped
        os.kill(pids[0], 0)


async def test_a_server_that_ends_after_starting_raises_the_exit_error() -> None:
    guard = python("import time; time.sleep(0.2); raise SystemExit(3)")
    with trio.fail_after(10), pytest.RaisesGroup(ExitError) as raised:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(partial(run_guarded, guard, **options()))
            assert started == "thing://here"
    assert str(raised.value.exceptions[0]) == "thing exited with status 3"


async def test_cancelled_it_stops_the_guard_by_closing_its_pipe() -> None:
    pids: list[int] = []

    async def ready(guard_pid: int) -> bool:
        pids.append(guard_pid)
        return True

    guard = python("import sys; sys.stdin.read()")  # ends at end of file, and only then
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_guarded, guard, **options(ready=ready)))
            nursery.cancel_scope.cancel()
    with pytest.raises(ProcessLookupError):  # ended and reaped before run_guarded returned
        os.kill(pids[0], 0)
