"""OTP-style supervision: restart types, strategies, intensity and escalation, backoff,
shutdown protocol, dynamic children and the keyed registry, snapshots and health."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from atrium.actors import Actor, ActorStopped
from atrium.supervision import (
    Backoff,
    ChildExists,
    ChildSpec,
    ChildState,
    NoSuchChild,
    Restart,
    Strategy,
    SupervisorEscalation,
    SupervisorStopped,
    actor_spec,
    open_supervisor,
    supervisor_spec,
)

NO_BACKOFF = Backoff(base=0.0)


class Boom(Exception):
    pass


class Script:
    """A child factory whose n-th start plays ``plan[n]``: ``("run",)``, ``("crash", after)``
    or ``("return", after)``; starts past the plan run forever. Every start, stop and exit
    goes to the shared event log."""

    def __init__(self, name: str, log: list[tuple[str, str]], *plan: tuple[Any, ...]) -> None:
        self.name = name
        self.log = log
        self.plan = list(plan)
        self.starts: list[float] = []

    def spec(self, restart: Restart = Restart.PERMANENT, **kwargs: Any) -> ChildSpec[None]:
        return ChildSpec(self.name, self, restart=restart, **kwargs)

    async def __call__(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.starts.append(trio.current_time())
        self.log.append(("start", self.name))
        action, *args = self.plan.pop(0) if self.plan else ("run",)
        task_status.started()
        try:
            if action == "run":
                await trio.sleep_forever()
            await trio.sleep(args[0])
        except trio.Cancelled:
            self.log.append(("stopped", self.name))
            raise
        self.log.append((action, self.name))
        if action == "crash":
            raise Boom(f"{self.name} crashed")


# -- restart types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "ending", "restarted"),
    [
        (Restart.PERMANENT, "return", True),
        (Restart.PERMANENT, "crash", True),
        (Restart.PERMANENT, "cancel", False),
        (Restart.TRANSIENT, "return", False),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TRANSIENT, "cancel", False),
        (Restart.TEMPORARY, "return", False),
        (Restart.TEMPORARY, "crash", False),
        (Restart.TEMPORARY, "cancel", False),
    ],
)
async def test_restart_type_decides_after_each_kind_of_ending(
    restart: Restart, ending: str, restarted: bool, autojump_clock: MockClock
) -> None:
    log: list[tuple[str, str]] = []
    plan = ("run",) if ending == "cancel" else (ending, 1.0)
    child = Script("w", log, plan)
    async with open_supervisor(name="sup", backoff=NO_BACKOFF) as sup:
        await sup.start_child(child.spec(restart))
        if ending == "cancel":
            await trio.sleep(1.0)
            await sup.terminate_child("w")  # cancellation by its own supervisor
        await trio.sleep(5.0)
        assert len(child.starts) == (2 if restarted else 1)
        assert [c.name for c in sup.which_children()] == (["w"] if restarted else [])
        assert sup.healthy()


# -- strategies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "after_crash"),
    [
        (Strategy.ONE_FOR_ONE, [("start", "b")]),
        (
            Strategy.ONE_FOR_ALL,
            [("stopped", "c"), ("stopped", "a"), ("start", "a"), ("start", "b"), ("start", "c")],
        ),
        (Strategy.REST_FOR_ONE, [("stopped", "c"), ("start", "b"), ("start", "c")]),
    ],
)
async def test_strategy_decides_which_siblings_restart_and_in_which_order(
    strategy: Strategy,
    after_crash: list[tuple[str, str]],
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    children = [Script("a", log), Script("b", log, ("crash", 1.0)), Script("c", log)]
    async with open_supervisor(name="sup", strategy=strategy, backoff=NO_BACKOFF) as sup:
        for child in children:
            await sup.start_child(child.spec())
        await trio.sleep(2.0)
        assert log[:4] == [("start", "a"), ("start", "b"), ("start", "c"), ("crash", "b")]
        assert log[4:] == after_crash
        assert [c.state for c in sup.which_children()] == [ChildState.RUNNING] * 3
        assert [c.restart_count for c in sup.which_children()] == [0, 1, 0]
        del log[:]
    assert log == [("stopped", "c"), ("stopped", "b"), ("stopped", "a")]


async def test_temporary_siblings_are_not_restarted_by_a_group_restart(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    a, b = Script("a", log, ("crash", 1.0)), Script("b", log)
    async with open_supervisor(
        name="sup", strategy=Strategy.ONE_FOR_ALL, backoff=NO_BACKOFF
    ) as sup:
        await sup.start_child(a.spec())
        await sup.start_child(b.spec(Restart.TEMPORARY))
        await trio.sleep(2.0)
        assert [c.name for c in sup.which_children()] == ["a"]
        assert log[-2:] == [("stopped", "b"), ("start", "a")]


# -- intensity and escalation ----------------------------------------------------------------


async def test_too_many_restarts_escalate_through_a_two_level_tree(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    db = Script("db", log)
    # Every worker instance crashes one second after it starts.
    worker = Script("worker", log, *[("crash", 1.0)] * 10)
    sub = supervisor_spec("sub", worker.spec(), max_restarts=0, backoff=NO_BACKOFF)
    with pytest.raises(SupervisorEscalation) as raised:
        async with open_supervisor(
            name="root", max_restarts=1, period=60, backoff=NO_BACKOFF
        ) as root:
            await root.start_child(db.spec())
            await root.start_child(sub)
            await trio.sleep_forever()
    escalation = raised.value
    assert escalation.code == "supervisor_escalation"
    assert (escalation.supervisor, escalation.child) == ("root", "sub")
    # The root restarted "sub" once (its allowance), then gave up on the second escalation.
    assert trio.current_time() == pytest.approx(2.0)
    inner = escalation.failure
    assert isinstance(inner, SupervisorEscalation)
    assert (inner.supervisor, inner.child) == ("sub", "worker")
    assert isinstance(inner.failure, Boom)
    assert worker.starts == [0.0, 1.0]
    # Giving up stops the surviving siblings too.
    assert log[-1] == ("stopped", "db")


async def test_restarts_older_than_the_period_do_not_count(autojump_clock: MockClock) -> None:
    log: list[tuple[str, str]] = []
    child = Script("w", log, *[("crash", 6.0)] * 5)
    async with open_supervisor(name="sup", max_restarts=1, period=5.0, backoff=NO_BACKOFF) as sup:
        await sup.start_child(child.spec())
        await trio.sleep(40.0)
        # One crash every 6 s is never two restarts within 5 s: no escalation.
        assert sup.child("w").restart_count == 5 and sup.healthy()


# -- backoff ---------------------------------------------------------------------------------


async def test_restarts_back_off_exponentially_up_to_the_cap(autojump_clock: MockClock) -> None:
    log: list[tuple[str, str]] = []
    child = Script("w", log, *[("crash", 0.0)] * 5)
    async with open_supervisor(
        name="sup", max_restarts=10, period=100.0, backoff=Backoff(base=1.0, maximum=4.0)
    ) as sup:
        await sup.start_child(child.spec())
        await trio.sleep(20.0)
    # Delays 1, 2, 4, then capped at 4.
    assert child.starts == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0]


async def test_backoff_falls_back_to_base_once_the_child_was_stable(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    child = Script("w", log, ("crash", 0.0), ("crash", 0.0), ("crash", 20.0))
    async with open_supervisor(
        name="sup", period=10.0, backoff=Backoff(base=1.0, maximum=8.0)
    ) as sup:
        await sup.start_child(child.spec())
        await trio.sleep(40.0)
    # 0 -> +1 -> +2, then 20 s stable: the next restart is the first within the period.
    assert child.starts == [0.0, 1.0, 3.0, 24.0]


def test_backoff_formula_and_validation() -> None:
    backoff = Backoff(base=0.5, maximum=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert Backoff(base=1.0, maximum=1e9).delay(10_000) == 1e9
    assert 0.5 <= Backoff(base=1.0, jitter=0.5).delay(1) <= 1.0
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2.0)


# -- shutdown ---------------------------------------------------------------------------------


async def test_children_stop_in_reverse_order_on_outside_cancellation(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    with trio.move_on_after(3.0):
        async with open_supervisor(name="sup") as sup:
            for name in "abc":
                await sup.start_child(Script(name, log).spec())
            await trio.sleep_forever()
    assert log[3:] == [("stopped", "c"), ("stopped", "b"), ("stopped", "a")]


class IgnoresStopRequests:
    """A child value that offers graceful stop but never honours it."""

    def request_stop(self) -> None:
        pass


async def test_child_ignoring_the_graceful_stop_is_cancelled_after_its_timeout(
    autojump_clock: MockClock,
) -> None:
    stopped_at: list[tuple[str, float]] = []

    async def stubborn(*, task_status: trio.TaskStatus[IgnoresStopRequests]) -> None:
        task_status.started(IgnoresStopRequests())
        try:
            await trio.sleep_forever()
        finally:
            stopped_at.append(("stubborn", trio.current_time()))

    async def plain(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            stopped_at.append(("plain", trio.current_time()))

    async with open_supervisor(name="sup") as sup:
        await sup.start_child(ChildSpec("plain", plain, shutdown_timeout=7.0))
        await sup.start_child(ChildSpec("stubborn", stubborn, shutdown_timeout=2.5))
    # Reverse order; the plain child is cancelled at once, the stubborn one at its timeout.
    assert stopped_at == [("stubborn", 2.5), ("plain", 2.5)]


class Busy(Actor[str, str]):
    async def handle(self, message: str) -> str:
        await trio.sleep(100)
        return message


async def test_actor_stuck_in_a_handler_is_cancelled_after_its_timeout(
    autojump_clock: MockClock,
) -> None:
    actor: Busy | None = None
    async with open_supervisor(name="sup") as sup:
        actor = (await sup.start_child(actor_spec("busy", Busy, shutdown_timeout=3.0))).value
        await actor.tell("work")
    assert trio.current_time() == pytest.approx(3.0)
    assert not actor.alive


async def test_shielded_child_is_waited_for_and_the_order_kept(
    caplog: pytest.LogCaptureFixture, autojump_clock: MockClock
) -> None:
    stopped_at: list[tuple[str, float]] = []

    async def first(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            stopped_at.append(("first", trio.current_time()))

    async def shielded(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(10)  # cleanup that outlives its shutdown_timeout
            stopped_at.append(("shielded", trio.current_time()))

    with caplog.at_level(logging.WARNING, logger="atrium.supervision"):
        async with open_supervisor(name="sup") as sup:
            await sup.start_child(ChildSpec("first", first))
            await sup.start_child(ChildSpec("shielded", shielded, shutdown_timeout=2.0))
    # No one can interrupt a shield in trio: the supervisor warned at the timeout and waited.
    assert stopped_at == [("shielded", 10.0), ("first", 10.0)]
    assert "did not stop within 2.0s" in caplog.text


# -- dynamic children --------------------------------------------------------------------------


async def test_dynamic_children_start_terminate_and_look_up(autojump_clock: MockClock) -> None:
    log: list[tuple[str, str]] = []
    async with open_supervisor(name="sup") as sup:
        handle = await sup.start_child(Script("a", log).spec())
        assert sup.child("a") is handle
        assert [c.state for c in sup.which_children()] == [ChildState.RUNNING]
        with pytest.raises(ChildExists) as exists:
            await sup.start_child(Script("a", log).spec())
        assert exists.value.code == "child_exists"
        await sup.terminate_child("a")
        assert handle.state is ChildState.STOPPED and sup.which_children() == []
        with pytest.raises(NoSuchChild) as missing:
            await sup.terminate_child("a")
        assert missing.value.code == "no_such_child"
    with pytest.raises(SupervisorStopped):
        await sup.start_child(Script("b", log).spec())


async def test_start_failure_reaches_the_caller_and_keeps_no_child(
    autojump_clock: MockClock,
) -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise Boom("cannot start")

    async with open_supervisor(name="sup") as sup:
        with pytest.raises(Boom):
            await sup.start_child(ChildSpec("broken", broken))
        assert sup.which_children() == [] and sup.healthy()


async def test_cancelling_the_caller_cancels_the_start_like_nursery_start(
    autojump_clock: MockClock,
) -> None:
    cancelled_at: list[float] = []

    async def slow(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            await trio.sleep(2.0)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise
        task_status.started()

    async with open_supervisor(name="sup") as sup:
        with trio.move_on_after(1.0):
            await sup.start_child(ChildSpec("slow", slow))
        assert cancelled_at == [1.0] and sup.which_children() == []
        assert sup.healthy()


async def test_terminate_during_backoff_cancels_the_pending_restart(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    child = Script("w", log, ("crash", 1.0))
    async with open_supervisor(name="sup", backoff=Backoff(base=5.0)) as sup:
        await sup.start_child(child.spec())
        await trio.sleep(2.0)
        assert sup.child("w").state is ChildState.RESTARTING
        await sup.terminate_child("w")
        await trio.sleep(10.0)
    assert child.starts == [0.0]


class Workspace(Actor[str, str]):
    made = 0

    def __init__(self, key: str, *, idle_timeout: float | None = None) -> None:
        super().__init__(name=key, idle_timeout=idle_timeout)
        Workspace.made += 1

    async def on_start(self) -> None:
        await trio.sleep(1.0)  # e.g. load state; long enough for callers to pile up

    async def handle(self, message: str) -> str:
        if message == "crash":
            raise Boom("workspace crashed")
        return f"{self.name}:{message}"


async def test_fifty_racing_get_or_start_calls_start_exactly_one_actor(
    autojump_clock: MockClock,
) -> None:
    Workspace.made = 0
    refs: list[Workspace] = []

    async def caller() -> None:
        refs.append(await sup.get_or_start(actor_spec("p1", lambda: Workspace("p1"))))

    async with open_supervisor(name="workspaces") as sup:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(caller)
        assert len(refs) == 50 and all(ref is refs[0] for ref in refs)
        assert Workspace.made == 1
        assert await refs[0].ask("hello") == "p1:hello"
        # Afterwards the existing actor is returned, not a new one.
        assert await sup.get_or_start(actor_spec("p1", lambda: Workspace("p1"))) is refs[0]


async def test_idle_actor_is_removed_and_the_next_call_starts_a_fresh_one(
    autojump_clock: MockClock,
) -> None:
    spec = actor_spec("p1", lambda: Workspace("p1", idle_timeout=30.0), restart=Restart.TRANSIENT)
    async with open_supervisor(name="workspaces") as sup:
        first = await sup.get_or_start(spec)
        await first.ask("hi")
        await trio.sleep(29.0)
        assert first.alive and [c.name for c in sup.which_children()] == ["p1"]
        await trio.sleep(2.0)
        assert not first.alive and sup.which_children() == []
        with pytest.raises(ActorStopped):
            await first.tell("late")
        second = await sup.get_or_start(spec)
        assert second is not first and second.alive


async def test_get_or_start_waits_out_a_stopping_actor(autojump_clock: MockClock) -> None:
    spec = actor_spec("p1", lambda: Workspace("p1"), restart=Restart.TRANSIENT)
    async with open_supervisor(name="workspaces") as sup:
        first = await sup.get_or_start(spec)
        first.request_stop()
        second = await sup.get_or_start(spec)
        assert second is not first and second.alive


async def test_get_or_start_returns_the_restarted_actor_after_a_crash(
    autojump_clock: MockClock,
) -> None:
    spec = actor_spec("p1", lambda: Workspace("p1"), restart=Restart.TRANSIENT)
    async with open_supervisor(name="workspaces", backoff=Backoff(base=2.0)) as sup:
        first = await sup.get_or_start(spec)
        with pytest.raises(Boom):
            await first.ask("crash")
        crashed_at = trio.current_time()
        second = await sup.get_or_start(spec)
        # Waited for the backoff (2 s) and the new instance's on_start (1 s).
        assert trio.current_time() - crashed_at == pytest.approx(3.0)
        assert second is not first and second.alive and not first.alive
        assert sup.child("p1").value is second


async def test_get_or_start_on_a_stopped_supervisor_raises(autojump_clock: MockClock) -> None:
    async with open_supervisor(name="workspaces") as sup:
        pass
    with pytest.raises(SupervisorStopped) as stopped:
        await sup.get_or_start(actor_spec("p1", lambda: Workspace("p1")))
    assert stopped.value.code == "supervisor_stopped"


# -- snapshots and health --------------------------------------------------------------------


async def test_snapshot_and_health_follow_a_crash_and_the_recovery(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, str]] = []
    child = Script("w", log, ("crash", 1.0))
    async with open_supervisor(name="sup", backoff=Backoff(base=2.0)) as sup:
        await sup.start_child(actor_spec("inbox", lambda: Workspace("inbox")))  # up at t=1
        await sup.start_child(child.spec())
        await trio.sleep(0.5)
        assert sup.healthy()

        await trio.sleep(1.5)  # t=3: crashed at 2, restart due at 4
        assert not sup.healthy()
        during = sup.snapshot().children[1]
        assert (during.state, during.restart_count, during.uptime) == ("restarting", 1, None)
        assert during.last_failure is not None
        assert (during.last_failure.type, during.last_failure.message) == ("Boom", "w crashed")
        assert during.last_failure.at.endswith("Z")

        await trio.sleep(1.5)  # t=4.5: running again since 4
        assert sup.healthy()
        after = sup.snapshot()
        inbox, w = after.children
        assert (w.state, w.restart_count, w.uptime) == ("running", 1, 0.5)
        assert w.last_failure == during.last_failure
        assert (inbox.mailbox_depth, w.mailbox_depth) == (0, None)
        assert (after.name, after.strategy, after.state) == ("sup", "one_for_one", "running")


async def test_nested_snapshot_is_json_ready(autojump_clock: MockClock) -> None:
    log: list[tuple[str, str]] = []
    async with open_supervisor(name="root") as root:
        await root.start_child(
            supervisor_spec("sub", Script("w", log).spec(), strategy=Strategy.REST_FOR_ONE)
        )
        await trio.sleep(1.0)
        data = json.loads(json.dumps(root.snapshot().to_dict()))
    assert data["name"] == "root" and data["healthy"] is True
    (sub,) = data["children"]
    assert (sub["kind"], sub["state"], sub["uptime"]) == ("supervisor", "running", 1.0)
    nested = sub["supervisor"]
    assert (nested["name"], nested["strategy"]) == ("sub", "rest_for_one")
    assert [c["name"] for c in nested["children"]] == ["w"]
    assert nested["children"][0]["restart"] == "permanent"


async def test_health_includes_nested_supervisors(autojump_clock: MockClock) -> None:
    log: list[tuple[str, str]] = []
    crashing = Script("w", log, ("crash", 1.0))
    async with open_supervisor(name="root") as root:
        await root.start_child(supervisor_spec("sub", crashing.spec(), backoff=Backoff(base=5.0)))
        assert root.healthy()
        await trio.sleep(2.0)
        assert not root.healthy()  # the grandchild is in backoff
        await trio.sleep(5.0)
        assert root.healthy()
