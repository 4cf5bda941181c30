"""The actor runtime: mailbox policies, ask/tell, errors, stop, idle, statistics."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from atrium.actors import Actor, ActorStopped, AskTimeout, MailboxFull


class Refused(Exception):
    pass


class Counter(Actor[object, object]):
    """Counts ``"incr"``; answers ``"get"``; misbehaves on request."""

    expected_errors = (Refused,)

    def __init__(self, *, mailbox_size: int = 16, idle_timeout: float | None = None) -> None:
        super().__init__(name="counter", mailbox_size=mailbox_size, idle_timeout=idle_timeout)
        self.count = 0
        self.gate = trio.Event()
        self.events: list[tuple[str, float]] = []
        self.busy = False

    async def on_start(self) -> None:
        self.events.append(("on_start", trio.current_time()))

    async def on_stop(self) -> None:
        self.events.append(("on_stop", trio.current_time()))

    def is_idle(self) -> bool:
        return not self.busy

    async def handle(self, message: object) -> object:
        match message:
            case "incr":
                self.count += 1
                return None
            case "get":
                return self.count
            case "wait_gate":
                await self.gate.wait()
                return "opened"
            case ("sleep", float() as seconds):
                await trio.sleep(seconds)
                return "slept"
            case "crash":
                raise ValueError("boom")
            case "refuse":
                raise Refused("not allowed")
        raise AssertionError(message)


async def test_tell_then_ask_sees_every_message_in_order() -> None:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter().run)
        for _ in range(10):
            await actor.tell("incr")
        actor.tell_nowait("incr")
        assert await actor.ask("get") == 11
        stats = actor.statistics()
        assert (stats.processed, stats.mailbox_capacity, stats.mailbox_depth) == (12, 16, 0)
        assert stats.alive
        nursery.cancel_scope.cancel()


async def test_on_start_runs_before_started_and_an_actor_runs_once() -> None:
    actor = Counter()
    async with trio.open_nursery() as nursery:
        assert await nursery.start(actor.run) is actor
        assert [name for name, _ in actor.events] == ["on_start"]
        nursery.cancel_scope.cancel()
    with pytest.raises(RuntimeError, match="already run"):
        await actor.run()


async def test_ask_reraises_the_handler_error_and_the_actor_crashes() -> None:
    actor = Counter()
    # run() ends with the handler's own exception (not a group): a supervisor's restart cue.
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="boom")):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            with pytest.raises(ValueError, match="boom"):
                await actor.ask("crash")
    assert not actor.alive
    with pytest.raises(ActorStopped) as stopped:
        await actor.tell("incr")
    assert stopped.value.code == "actor_stopped"


async def test_expected_errors_answer_the_asker_without_crashing() -> None:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter().run)
        with pytest.raises(Refused):
            await actor.ask("refuse")
        await actor.tell("refuse")  # nobody waits: logged and dropped
        await actor.tell("incr")
        assert await actor.ask("get") == 1
        assert actor.alive
        nursery.cancel_scope.cancel()


async def test_ask_times_out_and_the_abandoned_message_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter().run)
        await actor.tell("wait_gate")  # keeps the actor busy
        start = trio.current_time()
        with pytest.raises(AskTimeout) as timeout:
            await actor.ask("incr", timeout=2.5)
        assert timeout.value.code == "ask_timeout"
        assert trio.current_time() - start == pytest.approx(2.5)
        actor.gate.set()
        assert await actor.ask("get") == 0  # the timed-out "incr" was never handled
        nursery.cancel_scope.cancel()


async def test_ask_gets_actor_stopped_when_the_actor_dies_first() -> None:
    actor = Counter()
    outcomes: list[str] = []

    async def ask_behind_crash() -> None:
        try:
            await actor.ask("get", timeout=None)
        except ActorStopped:
            outcomes.append("stopped")

    with pytest.RaisesGroup(ValueError):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            await actor.tell("wait_gate")
            await actor.tell("crash")
            nursery.start_soon(ask_behind_crash)
            await trio.testing.wait_all_tasks_blocked()
            actor.gate.set()
    assert outcomes == ["stopped"]


async def test_ask_in_flight_gets_actor_stopped_when_the_actor_is_cancelled() -> None:
    actor = Counter()
    actor_scope = trio.CancelScope()

    async def run_actor() -> None:
        with actor_scope:
            await actor.run()

    async def cancel_when_parked() -> None:
        await trio.testing.wait_all_tasks_blocked()
        actor_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_actor)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancel_when_parked)
        with pytest.raises(ActorStopped):
            await actor.ask("wait_gate", timeout=None)


async def test_tell_nowait_fails_fast_and_tell_waits_when_the_mailbox_is_full() -> None:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter(mailbox_size=2).run)
        actor.tell_nowait("wait_gate")
        await trio.testing.wait_all_tasks_blocked()  # the actor took it and is parked
        actor.tell_nowait("incr")
        actor.tell_nowait("incr")
        assert actor.statistics().mailbox_depth == 2
        with pytest.raises(MailboxFull) as full:
            actor.tell_nowait("incr")
        assert full.value.code == "mailbox_full"

        delivered = trio.Event()

        async def patient() -> None:
            await actor.tell("incr")
            delivered.set()

        nursery.start_soon(patient)
        await trio.testing.wait_all_tasks_blocked()
        assert not delivered.is_set()
        actor.gate.set()
        await delivered.wait()
        assert await actor.ask("get") == 3
        nursery.cancel_scope.cancel()


async def test_request_stop_drains_the_mailbox_runs_on_stop_and_returns() -> None:
    actor = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await actor.tell("incr")
        await actor.tell("incr")
        actor.request_stop()
        assert not actor.alive
        with pytest.raises(ActorStopped):
            actor.tell_nowait("incr")
    # run() returned normally (the nursery did not raise) after handling the queue.
    assert actor.count == 2
    assert [name for name, _ in actor.events] == ["on_start", "on_stop"]


async def test_idle_actor_stops_after_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = Counter(idle_timeout=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.sleep(6)
        await actor.tell("incr")  # activity restarts the idle clock
        await trio.sleep(6)
        assert actor.alive
    assert actor.events[-1] == ("on_stop", 16.0)


async def test_idle_timeout_respects_is_idle(autojump_clock: trio.testing.MockClock) -> None:
    actor = Counter(idle_timeout=10.0)
    actor.busy = True
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.sleep(35)
        assert actor.alive
        actor.busy = False
    assert actor.events[-1] == ("on_stop", 40.0)


class Ticker(Actor[str, int]):
    """Uses its nursery for a timer that tells itself."""

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0

    async def on_start(self) -> None:
        self.nursery.start_soon(self._timer)

    async def _timer(self) -> None:
        while True:
            await trio.sleep(1)
            await self.tell("tick")

    async def handle(self, message: str) -> int:
        if message == "tick":
            self.ticks += 1
        return self.ticks


async def test_background_tasks_run_in_the_actor_nursery_and_end_with_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        await trio.sleep(3.5)
        assert await ticker.ask("count") == 3
        ticker.request_stop()
    # The timer was cancelled with the actor: run() returned and nothing is left running.
    with pytest.raises(RuntimeError, match="not running"):
        ticker.nursery  # noqa: B018


def test_constructor_validates_its_limits() -> None:
    with pytest.raises(ValueError, match="mailbox_size"):
        Counter(mailbox_size=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        Counter(idle_timeout=0)


class Batcher(Actor[object, object]):
    """Takes ``("add", n)`` in batches of what is queued behind it (``n == 0`` crashes
    after taking); records ``"marker"`` on its own; answers ``"batches"``."""

    def __init__(self) -> None:
        super().__init__(name="batcher", mailbox_size=16)
        self.batches: list[list[object]] = []
        self.gate = trio.Event()

    async def handle(self, message: object) -> object:
        if message == "wait_gate":
            await self.gate.wait()
        elif message == "batches":
            return self.batches
        elif message == "marker":
            self.batches.append(["marker"])
        else:
            assert isinstance(message, tuple)
            batch = [message[1]]
            while (more := self.take_nowait(lambda m: isinstance(m, tuple))) is not None:
                assert isinstance(more, tuple)
                batch.append(more[1])
            self.batches.append(batch)
            if 0 in batch:
                raise ValueError("crash after taking")
        return None


async def test_take_nowait_batches_queued_tells_and_keeps_the_rest_in_line() -> None:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Batcher().run)
        actor.tell_nowait("wait_gate")
        for message in (("add", 1), ("add", 2), ("add", 3), "marker", ("add", 4)):
            actor.tell_nowait(message)
        actor.gate.set()
        # The ask is queued last; asks are never taken into a batch.
        assert await actor.ask("batches", timeout=5) == [[1, 2, 3], ["marker"], [4]]
        nursery.cancel_scope.cancel()


async def test_an_ask_looked_at_but_not_taken_is_answered_when_the_actor_dies() -> None:
    batcher = Batcher()
    answers: list[object] = []

    async def ask_batches() -> None:
        try:
            answers.append(await batcher.ask("batches", timeout=5))
        except ActorStopped as error:
            answers.append(error)

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="crash after taking")):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            batcher.tell_nowait("wait_gate")
            batcher.tell_nowait(("add", 0))
            nursery.start_soon(ask_batches)
            await trio.testing.wait_all_tasks_blocked()
            batcher.gate.set()
    assert len(answers) == 1 and isinstance(answers[0], ActorStopped)


@pytest.mark.parametrize("idle_timeout", [None, 60.0])
async def test_an_idle_actor_keeps_no_exception_alive_while_it_waits(
    idle_timeout: float | None,
) -> None:
    # A thousand open workspaces wait on their mailboxes most of the time; a wait inside
    # the ``except WouldBlock`` clause kept each one's exception, traceback and frames
    # alive for as long as it waited (found by a census of the objects a join storm
    # leaves for the garbage collector to walk).
    import gc

    def parked() -> int:
        return sum(isinstance(o, trio.WouldBlock) for o in gc.get_objects())

    before = parked()
    async with trio.open_nursery() as nursery:
        actors = [await nursery.start(Counter(idle_timeout=idle_timeout).run) for _ in range(50)]
        for actor in actors:
            await actor.ask("incr")  # served, then waiting again for the next message
        await trio.testing.wait_all_tasks_blocked()
        assert parked() == before
        nursery.cancel_scope.cancel()
