"""The root's children, in order, and what a restart of each one restarts, on a real server.

The root is ``rest_for_one``: a child's restart restarts every child after it. Where a
child sits therefore decides what its crash costs (atrium/runtime/root.py, docs/ARCHITECTURE.md):
above all, a crash loop of the ``workspaces`` subtree must not release running jobs.

Each child of the real root is wrapped here, on the test side, so that the test can make
it fail as a bug would; the wrapper counts the starts of every child. The root's restart
intensity and backoff are tested in test_supervision.py: here they are lifted, so one
crash of each child in turn neither escalates nor waits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from conftest import StartServer

from atrium.persistence import database as database_module
from atrium.supervision import Backoff, ChildSpec, ChildState, Supervisor

# The root's children in a serving process with Redis (no ``postgres``: the tests' database
# runs outside the process), and, for each, the children its restart restarts.
ORDER = [
    "database",
    "event_retention",
    "http",
    "ws_listener",
    "jobs",
    "workspaces",
    "documents",
    "metrics",
    "cluster",
    "bridge",
]
RESTARTS = {
    "database": ORDER,
    "event_retention": ORDER[1:],
    "http": ORDER[ORDER.index("http") :],
    "ws_listener": ORDER[ORDER.index("ws_listener") :],
    "jobs": ORDER[ORDER.index("jobs") :],
    # The point of the order: the workspaces' crash leaves the jobs running.
    "workspaces": ["workspaces", "documents", "metrics", "cluster", "bridge"],
    "documents": ["documents", "metrics", "cluster", "bridge"],
    "metrics": ["metrics", "cluster", "bridge"],
    "cluster": ["cluster", "bridge"],
    "bridge": ["bridge"],
}


class InjectedCrash(Exception):
    pass


@dataclass
class Faults:
    """Starts of each root child, and a switch per running child that makes it crash."""

    starts: Counter[str] = field(default_factory=Counter)
    crash: dict[str, trio.Event] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def crashable(self, spec: ChildSpec[Any]) -> ChildSpec[Any]:
        async def run(*, task_status: trio.TaskStatus[Any]) -> None:
            crash = trio.Event()

            async def child(*, task_status: trio.TaskStatus[Any]) -> None:
                await spec.factory(task_status=task_status)
                nursery.cancel_scope.cancel()  # it ended by itself (asked to stop): so do we

            async with trio.open_nursery() as nursery:
                value = await nursery.start(child)
                self.crash[spec.name] = crash
                self.starts[spec.name] += 1
                self.changed.set()
                self.changed = trio.Event()
                task_status.started(value)
                await crash.wait()
                raise InjectedCrash(spec.name)

        return dataclasses.replace(spec, factory=run)

    async def wait_starts(self, wanted: Counter[str]) -> None:
        while any(self.starts[name] < n for name, n in wanted.items()):
            await self.changed.wait()


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    faults = Faults()
    start_child = Supervisor.start_child

    async def start_crashable(self: Supervisor, spec: ChildSpec[Any]) -> Any:
        if self.name != "root":
            return await start_child(self, spec)
        self.max_restarts = 1_000
        self.backoff = Backoff(base=0.0)
        return await start_child(self, faults.crashable(spec))

    monkeypatch.setattr(Supervisor, "start_child", start_crashable)
    # The crashed ``database`` child closes its pool while the children after it still hold
    # connections (LISTEN), and the close waits for them up to this long before it
    # terminates them. In a process the child never crashes by itself (it only sleeps):
    # it is stopped after those children, and its close is prompt.
    monkeypatch.setattr(database_module, "_CLOSE_TIMEOUT", 0.1)
    return faults


async def test_a_restart_restarts_exactly_the_children_after_it(
    start_server: StartServer, redis_url: str, faults: Faults
) -> None:
    async with start_server(REDIS_URL=redis_url) as server:
        root = server.bound.supervisor
        assert root is not None
        assert [c.name for c in root.which_children()] == ORDER
        assert faults.starts == Counter(ORDER)
        for name in ORDER:
            before = Counter(faults.starts)
            wanted = before + Counter(RESTARTS[name])
            with trio.fail_after(30):
                faults.crash[name].set()
                await faults.wait_starts(wanted)
                await trio.testing.wait_all_tasks_blocked()
            # Which children, not how often: while a crashed ``database`` unwinds, its pool
            # closes under the children after it, and one may fail on its own before the
            # root stops it (restarted twice, by the same rule).
            restarted = sorted(set(faults.starts - before), key=ORDER.index)
            assert restarted == RESTARTS[name], f"a restart of {name}"
            assert all(c.state is ChildState.RUNNING for c in root.which_children())
