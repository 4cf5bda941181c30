"""Actor runtime figures: tells/s and asks/s through one actor, and the time and memory
to start 10,000 idle actors under one supervisor.

Run: python bench/actors.py [--tells N] [--asks N] [--actors N] [--repeat N]
Rates are the best of --repeat runs (default 3): a shared machine only ever slows a run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import outcome  # noqa: E402

from atrium.actors import Actor, MailboxFull  # noqa: E402
from atrium.actors._reply import Ask  # noqa: E402
from atrium.supervision import actor_spec, open_supervisor  # noqa: E402


class Counter(Actor[int, int]):
    __slots__ = ("total",)

    def __init__(self) -> None:
        super().__init__(mailbox_size=1024)
        self.total = 0

    async def handle(self, message: int) -> int:
        self.total += message
        return self.total


async def tells(n: int) -> tuple[float, float]:
    """Tells/s with ``await tell`` (a checkpoint each) and with ``tell_nowait``."""
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter().run)
        start = time.perf_counter()
        for _ in range(n):
            await actor.tell(1)
        await actor.ask(0)  # every tell has been handled
        awaited = n / (time.perf_counter() - start)

        start = time.perf_counter()
        for _ in range(n):
            try:
                actor.tell_nowait(1)
            except MailboxFull:
                await actor.tell(1)
        await actor.ask(0)
        nowait = n / (time.perf_counter() - start)
        assert actor.total == 2 * n
        nursery.cancel_scope.cancel()
    return awaited, nowait


async def asks(n: int) -> float:
    async with trio.open_nursery() as nursery:
        actor = await nursery.start(Counter().run)
        start = time.perf_counter()
        for _ in range(n):
            await actor.ask(1)
        rate = n / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return rate


async def reply_slots(n: int) -> dict[str, float]:
    """Round trips/s through a bare server task with each way of carrying the reply."""
    rates: dict[str, float] = {}
    send, receive = trio.open_memory_channel[tuple[str, object]](100)

    async def server() -> None:
        async for kind, slot in receive:
            if kind == "event":
                assert isinstance(slot, trio.Event)
                slot.set()
            elif kind == "channel":
                assert isinstance(slot, trio.MemorySendChannel)
                slot.send_nowait(None)
            else:
                assert isinstance(slot, Ask)
                slot.resolve(outcome.Value(None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        for kind in ("event", "channel", "slot"):
            start = time.perf_counter()
            for _ in range(n):
                with trio.move_on_after(5):
                    if kind == "event":
                        event = trio.Event()
                        await send.send((kind, event))
                        await event.wait()
                    elif kind == "channel":
                        reply_send, reply_receive = trio.open_memory_channel[None](1)
                        await send.send((kind, reply_send))
                        await reply_receive.receive()
                    else:
                        ask = Ask(None)
                        await send.send((kind, ask))
                        await ask.wait()
            rates[kind] = n / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return rates


async def idle_actors(n: int, *, measure_memory: bool) -> tuple[float, float]:
    """Seconds to start ``n`` actors under one supervisor, and bytes held per actor."""
    gc.collect()
    if measure_memory:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if measure_memory else 0
    start = time.perf_counter()
    async with open_supervisor(name="bench") as sup:
        for i in range(n):
            await sup.start_child(actor_spec(f"a{i}", Counter))
        elapsed = time.perf_counter() - start
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - before) if measure_memory else 0
        assert len(sup.which_children()) == n and sup.healthy()
    if measure_memory:
        tracemalloc.stop()
    return elapsed, held / n


async def main(args: argparse.Namespace) -> None:
    runs = [await tells(args.tells) for _ in range(args.repeat)]
    awaited, nowait = max(run[0] for run in runs), max(run[1] for run in runs)
    print(f"tell (await, checkpoint per call): {awaited:>12,.0f} msgs/s  ({args.tells:,} msgs)")
    print(f"tell_nowait (await tell when full): {nowait:>11,.0f} msgs/s  ({args.tells:,} msgs)")
    ask_rate = max([await asks(args.asks) for _ in range(args.repeat)])
    print(f"ask round trips:                    {ask_rate:>11,.0f} asks/s  ({args.asks:,} asks)")
    slots = await reply_slots(args.asks)
    print(
        "reply carrier, bare round trips:   "
        + ", ".join(f"{kind} {rate:,.0f}/s" for kind, rate in slots.items())
    )
    elapsed = min(
        [(await idle_actors(args.actors, measure_memory=False))[0] for _ in range(args.repeat)]
    )
    _, per_actor = await idle_actors(args.actors, measure_memory=True)
    print(
        f"start {args.actors:,} idle actors under one supervisor: {elapsed:.3f} s "
        f"({args.actors / elapsed:,.0f} starts/s)"
    )
    print(f"memory per idle supervised actor (tracemalloc): {per_actor / 1024:.2f} KB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tells", type=int, default=200_000)
    parser.add_argument("--asks", type=int, default=50_000)
    parser.add_argument("--actors", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    trio.run(main, parser.parse_args())
