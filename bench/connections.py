"""Many connections on one machine: memory, join storm, idle CPU and delivery under load.

    python bench/connections.py [--mode single|workers|both] [--connections N]
                                [--projects 1000] [--idle 50] [--fanout 20] [--rate 10000]
                                [--json PATH] [--profile DIR]

``--profile DIR`` records each serving process with py-spy (``DIR/MODE/join[-N].txt``,
``idle[-N].txt``); ``BENCH_KEEP=DIR`` in the environment keeps the servers' logs and data
in DIR instead of a temporary directory.

Per mode, a fresh server on the dedicated WebSocket listener (WS_PORT), with the shipped
default heartbeat and ping settings, and an embedded PostgreSQL this script starts:

  single   ``python run.py`` pinned to core 0 (``taskset``), held just under its open-file
           limit (default 19,000 connections); the load processes are pinned to core 1.
  workers  ``python run.py --workers 3`` (default 50,000 connections), not pinned: three
           servers, PostgreSQL, Redis and the load share both cores.

Users, login sessions, ``--projects`` projects and their memberships are written straight
into PostgreSQL (signups are rate-limited and hashed on purpose), one user per connection,
users spread evenly over the projects; access tokens are minted here with the server's
secret. The load is ``--loaders`` processes (``bench/_ws.py``: one epoll loop each), each
connecting from its own loopback address (127.0.0.2, 127.0.0.3, ...: every address has
its own ephemeral ports) with ``Authorization: Bearer``; each stops by itself when the
parent goes (its stdin closes) or after ``--max-seconds``.

Measured, in that order:

  join storm   every connection opened (at most ``--join-concurrency`` pending per loader)
               until each got its PRESENCE_STATE: joins per second (authenticated, a
               member, joined to its workspace; USER_JOIN stored and sent to the others)
  memory       (server RSS with everyone connected - RSS before) / connections, once the
               server is quiet after the storm
  idle CPU     server CPU over ``--idle`` seconds (two heartbeat rounds at the shipped
               25 s) with everyone connected and silent but for the PONGs the heartbeat
               asks for, as % of one core, and scaled to 20,000 connections
  delivery     one sender per project moves its cursor; the paces add up to ``--rate``
               deliveries per second (a delivery: one CURSOR_UPDATE received by one
               member); send-to-receive latency p50/p99 (CLOCK_MONOTONIC, shared by the
               processes) and server CPU per delivery, over ``--fanout`` seconds

Sums over the serving processes (the three workers) are reported for ``workers``.
``--json PATH`` also writes these figures there, one per measurement with a value per mode
(bench/_figures.py), for bench/sidebyside.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's ``http``; the repository root is what we want there.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import heapq  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import asyncpg  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from bench._figures import Figure, Value, write_figures  # noqa: E402
from bench._load import (  # noqa: E402
    HOST,
    REPO,
    atrium_env,
    free_port,
    log_tail,
    nearest_rank_ms,
    open_process,
    print_load_average,
    run_script,
    wait_http_ok,
    wait_port,
)
from bench._ws import Conn, Engine  # noqa: E402

START_TIMEOUT = 120.0
PONG = b'{"type":"PONG"}'
CURSOR_RE = re.compile(rb'"column":(\d+)')  # the send time, CLOCK_MONOTONIC microseconds
TARGETS = {"kb_per_conn": 12.0, "join_seconds_50k": 60.0, "idle_pct_20k": 5.0, "p99_ms": 50.0}
ISSUER, AUDIENCE = "workspace-backend", "workspace-api"  # the defaults of JWT_ISSUER/AUDIENCE


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["single", "workers", "both"], default="both")
    parser.add_argument(
        "--connections", type=int, help="default: 19,000 (single), 50,000 (workers)"
    )
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--loaders", type=int, help="load processes (default: 1 per 6,500)")
    parser.add_argument("--join-concurrency", type=int, default=200, help="per loader")
    parser.add_argument("--idle", type=float, default=50.0, help="seconds of idle measurement")
    parser.add_argument("--fanout", type=float, default=20.0, help="seconds of fan-out")
    parser.add_argument(
        "--baseline", type=float, default=10.0, help="seconds of the server with no connection"
    )
    parser.add_argument("--rate", type=float, default=10_000.0, help="deliveries/s")
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="loaders stop then")
    parser.add_argument(
        "--profile",
        help="directory: py-spy records each serving process's join storm and idle phase"
        " in DIR/MODE/ (collapsed stacks, join[-N].txt and idle[-N].txt; PY_SPY names"
        " the binary)",
    )
    parser.add_argument("--json", help="also write the side-by-side figures here (JSON)")
    parser.add_argument("--loader", help=argparse.SUPPRESS)  # run as a load process
    return parser.parse_args(argv)


# -- seeding -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seat:
    """One connection to open: its token and project, and whether it sends cursors."""

    token: str
    project: str
    sender: bool
    members: int


def mint(secret: str, user_id: uuid.UUID, email: str, session_id: uuid.UUID) -> str:
    from atrium.identity.tokens import TokenCodec

    codec = TokenCodec(secret, ISSUER, AUDIENCE, 4 * 3600, 86400)
    token, _ = codec.issue(
        type="access", user_id=user_id, email=email, role="user", session_id=session_id
    )
    return token


async def _seed(url: str, secret: str, count: int, projects: int) -> list[Seat]:
    users = [uuid.uuid4() for _ in range(count)]
    sessions = [uuid.uuid4() for _ in range(count)]
    project_ids = [uuid.uuid4() for _ in range(projects)]
    emails = [f"conn-{i}-{user.hex[:8]}@example.com" for i, user in enumerate(users)]
    member_of = [project_ids[i % projects] for i in range(count)]
    owners = {project_ids[i]: users[i] for i in range(min(projects, count))}
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "users",
            records=[(u, e, e, "x") for u, e in zip(users, emails, strict=True)],
            columns=["id", "email", "email_normalised", "password_hash"],
        )
        await conn.copy_records_to_table(
            "sessions",
            records=list(zip(sessions, users, strict=True)),
            columns=["id", "user_id"],
        )
        await conn.copy_records_to_table(
            "projects",
            records=[(p, f"load {i}", owners[p]) for i, p in enumerate(project_ids)],
            columns=["id", "name", "owner_id"],
        )
        await conn.copy_records_to_table(
            "project_members",
            records=[
                (p, u, "owner" if owners[p] == u else "collaborator")
                for u, p in zip(users, member_of, strict=True)
            ],
            columns=["project_id", "user_id", "role"],
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    sizes = Counter(member_of)
    return [
        Seat(mint(secret, u, e, s), str(p), i < projects, sizes[p])
        for i, (u, e, s, p) in enumerate(zip(users, emails, sessions, member_of, strict=True))
    ]


def seed(url: str, secret: str, count: int, projects: int) -> list[Seat]:
    started = time.perf_counter()
    seats = asyncio.run(_seed(url, secret, count, projects))
    print(
        f"  seeded {count:,} users and sessions, {projects:,} projects, {count:,} memberships,"
        f" minted {count:,} tokens in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return seats


# -- the load processes --------------------------------------------------------------------


class Load:
    """One load process: its seats, its epoll loop, its counts."""

    def __init__(self, plan: dict) -> None:
        self.port = plan["port"]
        self.source = plan["source"]
        self.seats = [Seat(*s) for s in plan["seats"]]
        self.concurrency = plan["concurrency"]
        self.deadline = time.monotonic() + plan["max_seconds"]
        self.engine = Engine()
        self.conns: list[Conn] = []
        self.recording = False
        self.latencies: list[float] = []
        self.deliveries = 0
        self.pongs = 0

    def handle(self, conn: Conn, payload: bytes, now: float) -> None:
        if not conn.ready:
            conn.ready = True
            conn.opened_at = now  # joined: PRESENCE_STATE, the first frame after the Join
            return
        if b'"PING"' in payload:
            conn.send_text(PONG)
            self.pongs += 1
            return
        if self.recording and b"CURSOR_UPDATE" in payload:
            found = CURSOR_RE.findall(payload)
            self.deliveries += len(found)
            for sent in found:
                self.latencies.append(now - int(sent) * 1e-6)

    def say(self, *words: object) -> None:
        print(*words, flush=True)

    def join(self) -> None:
        started = time.perf_counter()
        pending = iter(self.seats)
        opening: list[Conn] = []
        exhausted = False
        while True:
            opening = [c for c in opening if not c.ready and c.error is None]
            while not exhausted and len(opening) < self.concurrency:
                seat = next(pending, None)
                if seat is None:
                    exhausted = True
                    break
                conn = self.engine.connect(
                    HOST,
                    self.port,
                    f"/ws/{seat.project}",
                    headers={"Authorization": f"Bearer {seat.token}"},
                    handler=self.handle,
                    source=self.source,
                )
                self.conns.append(conn)
                opening.append(conn)
            if exhausted and not opening:
                break
            if time.monotonic() > self.deadline:
                break
            self.engine.poll(0.02)
        joined = [c for c in self.conns if c.ready and c.error is None]
        last = max((c.opened_at for c in joined), default=started)
        errors = Counter((c.error or "?")[:80] for c in self.conns if not c.ready)
        self.say("joined", len(joined), started, last, orjson.dumps(errors).decode())

    def alive(self) -> int:
        return sum(1 for c in self.conns if c.ready and c.error is None)

    def serve_until(self, command_ready: float) -> str | None:
        """Poll until a command arrives on stdin (returned), stdin closes or the
        deadline passes (None)."""
        while time.monotonic() < self.deadline:
            ready, _, _ = select.select([sys.stdin], [], [], 0)
            if ready:
                line = sys.stdin.readline()
                return line.strip() if line else None
            self.engine.poll(command_ready)
        return None

    def fanout(self, rate_per_sender: float, seconds: float, warmup: float) -> None:
        senders = [c for c, s in zip(self.conns, self.seats, strict=False) if s.sender and c.ready]
        now = time.perf_counter()
        interval = 1.0 / rate_per_sender if rate_per_sender > 0 else math.inf
        due = [(now + interval * i / max(len(senders), 1), i) for i in range(len(senders))]
        heapq.heapify(due)
        start_recording, end = now + warmup, now + warmup + seconds
        sent = 0
        while True:
            now = time.perf_counter()
            if not self.recording and now >= start_recording:
                self.recording = True
            if now >= end:
                break
            while due and due[0][0] <= now:
                at, i = heapq.heappop(due)
                conn = senders[i]
                stamp = int(time.perf_counter() * 1e6)
                conn.send_text(
                    b'{"type":"CURSOR_UPDATE","position":{"file":"f","line":1,"column":%d}}' % stamp
                )
                sent += 1
                heapq.heappush(due, (at + interval, i))
            self.engine.poll(min(0.002, max(0.0, (due[0][0] if due else end) - now)))
        # Let the last deliveries land.
        settle = time.perf_counter() + 1.0
        while time.perf_counter() < settle:
            self.engine.poll(0.01)
        self.recording = False
        self.say("fanned", sent, self.deliveries, orjson.dumps(self.latencies).decode())


def run_loader(plan_path: str) -> int:
    plan = orjson.loads(Path(plan_path).read_bytes())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load = Load(plan)
    load.join()
    while True:
        command = load.serve_until(0.05)
        if command is None or command == "stop":
            break
        words = command.split()
        if words[0] == "alive":
            load.say("alive", load.alive(), load.pongs)
        elif words[0] == "fanout":
            load.fanout(float(words[1]), float(words[2]), float(words[3]))
    load.engine.close_all()
    return 0


# -- the parent ----------------------------------------------------------------------------


@dataclass
class Loaders:
    processes: list[subprocess.Popen[bytes]]

    def tell(self, line: str) -> None:
        for p in self.processes:
            assert p.stdin is not None
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()

    def answers(self, word: str) -> list[list[str]]:
        """Each loader's next line starting with ``word``, split once per field."""
        out = []
        for p in self.processes:
            assert p.stdout is not None
            while True:
                line = p.stdout.readline().decode()
                if not line:
                    raise SystemExit(f"a loader exited (code {p.poll()}) before '{word}'")
                if line.startswith(word + " "):
                    out.append(line.split(" ", 4 if word == "joined" else 3))
                    break
                print("  loader:", line.rstrip(), flush=True)
        return out


@contextmanager
def open_loaders(
    work: Path, seats: list[Seat], ws_port: int, count: int, args: argparse.Namespace, cpu: str
) -> Iterator[Loaders]:
    processes = []
    try:
        for i in range(count):
            plan = {
                "port": ws_port,
                "source": f"127.0.0.{2 + i}",
                "seats": [(s.token, s.project, s.sender, s.members) for s in seats[i::count]],
                "concurrency": args.join_concurrency,
                "max_seconds": args.max_seconds,
            }
            path = work / f"loader-{i}.json"
            path.write_bytes(orjson.dumps(plan))
            argv = [sys.executable, __file__, "--loader", str(path)]
            if cpu:
                argv = ["taskset", "-c", cpu, *argv]
            processes.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
            )
        yield Loaders(processes)
    finally:
        for p in processes:
            try:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()


@contextmanager
def profiling(directory: str | None, name: str, pids: list[int]) -> Iterator[None]:
    """py-spy records each of ``pids`` during the block into ``directory/name.txt``
    (``name-N.txt`` for the N-th of several; collapsed stacks: one line per stack, its
    sample count last)."""
    if directory is None:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    spies = []
    for n, pid in enumerate(pids):
        out = f"{directory}/{name}.txt" if len(pids) == 1 else f"{directory}/{name}-{n}.txt"
        argv = [os.environ.get("PY_SPY", "py-spy"), "record", "--format", "raw", "-r", "100"]
        argv += ["--nonblocking", "--pid", str(pid), "-o", out]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=60)


def serving(pid: int, mode: str) -> list[psutil.Process]:
    root = psutil.Process(pid)
    if mode == "single":
        return [root]
    return [c for c in root.children() if "--supervised" in " ".join(c.cmdline())]


def rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs)


def cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def wait_quiet(procs: list[psutil.Process], limit: float = 60.0) -> None:
    """Until the servers use under 30% of a core over a second (the storm's tail)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu(procs)
        time.sleep(1.0)
        if cpu(procs) - before < 0.3:
            return


def run_mode(mode: str, args: argparse.Namespace, work: Path, url: str) -> dict[str, float]:
    count = args.connections or (19_000 if mode == "single" else 50_000)
    loaders = args.loaders or max(2, math.ceil(count / 6_500))
    secret = secrets.token_urlsafe(48)
    port, ws_port = free_port(HOST), free_port(HOST)
    data_dir = work / f"atrium-{mode}"
    env = atrium_env(
        port,
        data_dir,
        url,
        SECRET_KEY=secret,
        WS_PORT=str(ws_port),
        METRICS_PORT="0",
        # The bench's one user per connection joins once; lifted as in every bench:
        # per-user bounds and HTTP rate limits (atrium_env). Heartbeats: shipped defaults.
    )
    # ATRIUM_RUN: a wrapper to run instead of run.py (tracemalloc: sent SIGUSR2 before the
    # load, SIGUSR1 once everyone is connected), for experiments that must not live in run.py.
    wrapper = os.environ.get("ATRIUM_RUN")
    argv = [sys.executable, *([wrapper] if wrapper else []), "run.py"]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    if mode == "single":
        argv = ["taskset", "-c", "0", *argv]
        load_cpu = "1"
        note = "server pinned to core 0, load to core 1"
    else:
        argv += ["--workers", str(args.workers)]
        load_cpu = ""
        note = f"--workers {args.workers}: NOT pinned (2 cores shared by all processes)"
    print(f"\n== {mode}: {count:,} connections, {args.projects:,} projects; {note}", flush=True)
    print("  " + " ".join(argv[argv.index("run.py") :]), flush=True)
    log_path = work / f"{mode}.log"
    seats = seed(url, secret, count, args.projects)
    with open_process(argv, env=env, log_path=log_path, cwd=REPO) as server:
        try:
            wait_http_ok(HOST, port, "/health", server, timeout=START_TIMEOUT)
            wait_port(HOST, ws_port, server, timeout=START_TIMEOUT)
        except BaseException:
            print(log_tail(log_path), flush=True)
            raise
        time.sleep(2.0)
        procs = serving(server.pid, mode)
        # What the servers cost with no connection (job polling, pool pings): the idle
        # figure is given with and without it.
        c0, t0 = cpu(procs), time.perf_counter()
        time.sleep(args.baseline)
        empty_cpu = (cpu(procs) - c0) / (time.perf_counter() - t0)
        print(f"  no connection: {empty_cpu * 100:.1f}% of a core", flush=True)
        rss_before = rss(procs)
        if wrapper:
            for p in procs:
                p.send_signal(signal.SIGUSR2)
        profile = args.profile and str(Path(args.profile) / mode)
        join_cpu = cpu(procs)
        with open_loaders(work, seats, ws_port, loaders, args, load_cpu) as load:
            with profiling(profile, "join", [p.pid for p in procs]):
                joined = load.answers("joined")
            held = sum(int(j[1]) for j in joined)
            first = min(float(j[2]) for j in joined)
            last = max(float(j[3]) for j in joined)
            errors: Counter[str] = Counter()
            for j in joined:
                errors.update(orjson.loads(j[4]))
            join_s = last - first
            join_cpu = cpu(procs) - join_cpu
            print(
                f"  join storm: {held:,} of {count:,} joined in {join_s:.1f} s"
                f" ({held / join_s:,.0f} joins/s); server CPU {join_cpu / held * 1e3:.2f} ms"
                f" a join ({join_cpu / join_s * 100:.0f}% of a core); {loaders} load processes",
                flush=True,
            )
            if errors:
                print(f"  not joined: {dict(errors.most_common(5))}", flush=True)
            wait_quiet(procs)
            rss_after = rss(procs)
            if wrapper:
                for p in procs:
                    p.send_signal(signal.SIGUSR1)
            kb = (rss_after - rss_before) / held / 1024
            print(
                f"  memory: {kb:.1f} KB per connection"
                f" (RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB)",
                flush=True,
            )
            c0, t0 = cpu(procs), time.perf_counter()
            with profiling(profile, "idle", [p.pid for p in procs]):
                time.sleep(args.idle)
            idle_cpu = (cpu(procs) - c0) / (time.perf_counter() - t0)
            load.tell("alive")
            alive = load.answers("alive")
            still = sum(int(a[1]) for a in alive)
            pongs = sum(int(a[2]) for a in alive)
            per_20k = idle_cpu * 100 * 20_000 / max(still, 1)
            net_20k = (idle_cpu - empty_cpu) * 100 * 20_000 / max(still, 1)
            print(
                f"  idle: {idle_cpu * 100:.1f}% of a core over {args.idle:g} s for {still:,}"
                f" connections = {per_20k:.1f}% per 20,000; {net_20k:.1f}% per 20,000 over"
                f" the server with no connection ({pongs:,} PONGs so far)",
                flush=True,
            )
            per_project = max(1, held // args.projects)
            rate_per_sender = args.rate / (args.projects * max(per_project - 1, 1))
            c0, t0 = cpu(procs), time.perf_counter()
            load.tell(f"fanout {rate_per_sender} {args.fanout} 2.0")
            fanned = load.answers("fanned")
            fan_cpu = cpu(procs) - c0
            latencies = sorted(x for f in fanned for x in orjson.loads(f[3]))
            deliveries = sum(int(f[2]) for f in fanned)
            sent = sum(int(f[1]) for f in fanned)
            p50 = nearest_rank_ms(latencies, 50)
            p99 = nearest_rank_ms(latencies, 99)
            rate = deliveries / args.fanout
            print(
                f"  delivery: {rate:,.0f} deliveries/s measured ({sent:,} cursor moves sent),"
                f" p50 {p50:.1f} ms, p99 {p99:.1f} ms;"
                f" server CPU {fan_cpu / (time.perf_counter() - t0) * 100:.0f}% of a core",
                flush=True,
            )
            load.tell("stop")
    print_load_average(f"after {mode}")
    return {
        "held": held,
        "count": count,
        "join_s": join_s,
        "joins_per_s": held / join_s,
        "join_cpu_ms": join_cpu / held * 1e3,
        "kb": kb,
        "idle_pct_20k": per_20k,
        "idle_net_20k": net_20k,
        "p99": p99,
        "rate": rate,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.loader:
        return run_loader(args.loader)
    print(f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}", flush=True)
    print_load_average("before")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"open-file limit per process: {soft} soft, {hard} hard", flush=True)
    modes = ["single", "workers"] if args.mode == "both" else [args.mode]
    from atrium.persistence.embedded import embedded_postgres

    results = {}
    # BENCH_KEEP=DIR keeps the servers' logs (and data) there instead of a temporary directory.
    keep = os.environ.get("BENCH_KEEP")
    with (
        contextlib.nullcontext(keep)
        if keep
        else tempfile.TemporaryDirectory(prefix="atrium-conns-") as tmp
    ):
        work = Path(tmp)
        for mode in modes:
            with embedded_postgres(work / f"pg-{mode}") as url:
                migrate = [sys.executable, "run.py", "migrate"]
                env = atrium_env(0, work / "migrate", url)
                subprocess.run(migrate, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                results[mode] = run_mode(mode, args, work, url)
    print("\nmode      held / asked      KB/conn  joins/s  idle %/20k (net)  p99 ms  (targets:"
          " <12 KB, 50,000 in <60 s = 833/s, <5%, <50 ms)")  # fmt: skip
    for mode, r in results.items():
        print(
            f"{mode:8}  {r['held']:>6,.0f} / {r['count']:<6,.0f}  {r['kb']:7.1f}"
            f"  {r['held'] / r['join_s']:7,.0f}  {r['idle_pct_20k']:10.1f}"
            f" ({r['idle_net_20k']:4.1f})  {r['p99']:6.1f}"
        )
    if args.json:
        write_figures(args.json, figures(results, args))
    return 0


def figures(results: dict[str, dict[str, float]], args: argparse.Namespace) -> list[Figure]:
    """The side-by-side figures of this run (bench/_figures.py): one per measurement, a
    value per mode; no peer beside them, the targets in words."""
    labels = {
        "single": "one process, pinned",
        "workers": f"--workers {args.workers}, not pinned",
    }

    def per_mode(key: str) -> list[Value]:
        return [Value(f"{labels[m]}, {r['held']:,.0f} held", r[key]) for m, r in results.items()]

    return [
        Figure(
            f"memory per idle connection, {args.projects:,} projects",
            "KB",
            per_mode("kb"),
            target=f"under {TARGETS['kb_per_conn']:g} KB",
        ),
        Figure(
            "join storm: authenticated joins accepted a second",
            "joins/s",
            per_mode("joins_per_s"),
            better="higher",
            target="50,000 in under 60 s (833/s)",
        ),
        Figure("join storm: server CPU a join", "ms", per_mode("join_cpu_ms")),
        Figure(
            "idle connections: server CPU per 20,000 (heartbeats, pings)",
            "% of a core",
            per_mode("idle_pct_20k"),
            target=f"under {TARGETS['idle_pct_20k']:g}%",
        ),
        Figure(
            f"delivery p99 at {args.rate:,.0f} deliveries/s, everyone connected",
            "ms",
            per_mode("p99"),
            target=f"under {TARGETS['p99_ms']:g} ms",
        ),
    ]


if __name__ == "__main__":
    run_script(main)
