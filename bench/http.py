"""HTTP benchmark: atrium's cold start and request rate, against the floor of its stack and a peer.

    python bench/http.py [--duration 10] [--connections 64] [--projects 50]
                         [--stampede-duration 12] [--database-url URL] [--json PATH]

1. cold start: ``run.py`` on a fresh data directory (embedded PostgreSQL initialised from
   nothing, unless --database-url: then a fresh database on that server, dropped at the
   end) until ``GET /health`` answers 200;
2. on that server (default settings: SESSION_CACHE_SECONDS=5, PROJECT_CACHE_TTL_SECONDS=60)
   ``GET /health``, and with the bearer token of a user it signs up and who owns
   ``--projects`` projects, ``GET /api/v1/auth/me`` and ``GET /api/v1/projects/``;
   then ``/auth/me`` again for ``--stampede-duration`` seconds, across several session
   cache expiries: the slowest request and p99 against p50 show whether requests stall
   behind an expiry (issue 11's stampede);
3. a second ``run.py`` on the same database with both caches off, and beside it the peer:
   a minimal FastAPI + uvicorn app (bench/peer_fastapi.py, the ``bench`` extra) doing the
   same work on the same database (PyJWT verification, the same SQL on an asyncpg pool);
   ``/auth/me`` and ``/projects/`` on each, one after the other;
4. the same load on a bare ASGI app under the server atrium runs (bench/hello_asgi.py
   --seam: hypercorn's trio worker as ``atrium.seams.hypercorn_server`` has it);
5. a summary with the ratios to that floor and to the peer, and the targets. Exit status 1
   if one is missed. ``--json PATH`` also writes the side-by-side figures there
   (bench/_figures.py: what bench/sidebyside.py collects).

Each server is its own process (one core at most, the GIL); this client runs alongside and
reports its own CPU use so a reader can check it was not the bottleneck. ``srv us/req`` is
server CPU time per request, the figure to compare when other work shares the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path and this file would shadow the
# standard library's ``http`` package; the repository root is what we want there.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

import orjson  # noqa: E402
import trio  # noqa: E402

from bench._figures import Figure, Value, write_figures  # noqa: E402
from bench._load import (  # noqa: E402
    HOST,
    REPO,
    LoadResult,
    add_load_options,
    api_request,
    build_request,
    exit_if_not_started,
    fetch,
    free_port,
    log_tail,
    open_atrium,
    open_process,
    print_load_average,
    print_report,
    print_run_header,
    process_cpu,
    run_load,
    run_script,
    sign_up,
    wait_http_ok,
)

COLD_START_TARGET = 5.0
START_TIMEOUT = 60.0
HEALTH_TARGET = 0.8
ME_TARGET = 0.6
# Issue 11: against the peer, and no stall behind a cache expiry.
PEER_COST_TARGET = 1.3  # caches off: atrium's server us/req at most this x the peer's
STALL_MAX_MS = 200.0  # /auth/me, default settings: the slowest request
STALL_P99_OVER_P50 = 1.5
ME = "/api/v1/auth/me"
PROJECTS = "/api/v1/projects/"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    result: LoadResult
    target: float | None  # minimum ratio to the floor


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/http.py", description="atrium HTTP benchmark (cold start, req/s, latency)."
    )
    add_load_options(parser)
    parser.set_defaults(connections=64)
    parser.add_argument(
        "--database-url",
        help="an existing PostgreSQL server: the bench creates a fresh database on it and"
        " drops it at the end (default: embedded, in a temp data dir)",
    )
    parser.add_argument(
        "--projects", type=int, default=50, help="projects the benchmark user owns (default 50)"
    )
    parser.add_argument(
        "--stampede-duration",
        type=float,
        default=12.0,
        help="seconds of /auth/me with the default 5 s session cache (default 12; 0 skips)",
    )
    parser.add_argument("--json", help="also write the side-by-side figures here (JSON)")
    return parser.parse_args(argv)


def report(name: str, result: LoadResult) -> None:
    print_report(
        result,
        f"  {name}: {result.rate:,.0f} req/s  p50 {result.percentile_ms(50):.2f} ms"
        f"  p99 {result.percentile_ms(99):.2f} ms  max {max_ms(result):.2f} ms"
        f"  errors {result.errors}  | CPU/wall: {result.cpu_shares()}",
    )
    if "server" in result.cpu and result.completed:
        print(f"    server CPU per request: {result.cpu_us_per_request():.0f} us")
    if result.cpu["client"] > 0.8:
        print("    warning: the client used >80% of a core; it may be the bottleneck")
    if result.cpu.get("server", 1.0) < 0.9:
        print(
            "    warning: the server used <90% of a core: other processes took the CPU (see"
            " the load average) or the client held it back; req/s is understated"
        )


def max_ms(result: LoadResult) -> float:
    """The slowest request of the window, in milliseconds (NaN with none)."""
    return result.latencies[-1] * 1000 if result.latencies else math.nan


def authorized(port: int, path: str, token: str) -> bytes:
    return build_request(
        "GET", path, host=f"{HOST}:{port}", headers={"Authorization": f"Bearer {token}"}
    )


async def set_up(port: int, projects: int) -> str:
    """A fresh user owning ``projects`` projects; returns its access token."""
    token = await sign_up(port)
    for i in range(projects):
        body = {"name": f"Project {i}", "description": "x" * 80}
        status, raw = await fetch(HOST, port, api_request("POST", PROJECTS, port, body, token))
        if status != 201:
            raise RuntimeError(f"creating a project answered {status}: {raw[:200]!r}")
    return token


@dataclass(frozen=True, slots=True)
class Cached:
    """What the server with default settings measured."""

    cold_start: float
    scenarios: list[Scenario]  # /health and /me, with their targets against the floor
    projects: LoadResult
    stampede: LoadResult | None
    token: str


def bench_atrium(args: argparse.Namespace, data_dir: Path, work: Path, secret: str) -> Cached:
    note = f" ({'DATABASE_URL given' if args.database_url else 'embedded PostgreSQL'})"
    with open_atrium(
        "atrium",
        data_dir,
        work / "atrium.log",
        timeout=START_TIMEOUT,
        note=note,
        database_url=args.database_url,
        SECRET_KEY=secret,
    ) as atrium:
        cold_start = atrium.cold_start
        print(f"  cold start: {cold_start:.2f} s (process start to GET /health 200)", flush=True)
        token = trio.run(set_up, atrium.port, args.projects)
        probes = atrium.probes()
        host = f"{HOST}:{atrium.port}"
        scenarios = []
        for name, request, target in (
            ("GET /health", build_request("GET", "/health", host=host), HEALTH_TARGET),
            (f"GET {ME}", authorized(atrium.port, ME, token), ME_TARGET),
        ):
            result = run_load(atrium.port, request, args, probes)
            report(name, result)
            scenarios.append(Scenario(name, result, target))
        projects = run_load(atrium.port, authorized(atrium.port, PROJECTS, token), args, probes)
        report(f"GET {PROJECTS}", projects)
        stampede = None
        if args.stampede_duration > 0:
            longer = argparse.Namespace(**{**vars(args), "duration": args.stampede_duration})
            stampede = run_load(atrium.port, authorized(atrium.port, ME, token), longer, probes)
            report(f"GET {ME} for {args.stampede_duration:g} s (session cache expiries)", stampede)
    return Cached(cold_start, scenarios, projects, stampede, token)


@contextlib.contextmanager
def dedicated_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server at ``server_url`` for the block; dropped after it."""
    import asyncpg

    name = f"atrium_bench_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(server_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def embedded_url(data_dir: Path) -> str:
    """The URL of the embedded PostgreSQL that ``run.py`` runs in ``data_dir``.

    Read from its ``postmaster.pid`` (line 4: the port, line 5: the socket directory),
    so the peer connects where atrium does.
    """
    lines = (data_dir / "pg" / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres:@/postgres?host={lines[4]}&port={lines[3]}"


@dataclass(frozen=True, slots=True)
class Peer:
    process: subprocess.Popen[bytes]
    port: int


@contextlib.contextmanager
def open_peer(database_url: str, secret: str, work: Path) -> Iterator[Peer]:
    """bench/peer_fastapi.py on a free port for the block; yields it once it answers."""
    port = free_port(HOST)
    log_path = work / "peer.log"
    print(f"peer: python -m bench.peer_fastapi --port {port} (FastAPI + uvicorn)", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "bench.peer_fastapi", "--host", HOST, "--port", str(port)]
    argv += ["--database-url", database_url, "--secret", secret]
    with open_process(argv, env=env, log_path=log_path, cwd=REPO) as peer:
        with exit_if_not_started("the peer (pip install -e '.[bench]')", log_path):
            wait_http_ok(HOST, port, "/health", peer, timeout=START_TIMEOUT)
        yield Peer(peer, port)


def same_answers(atrium_port: int, peer: Peer, token: str, log_path: Path) -> None:
    """Check that the peer answers what atrium answers (one request each), or exit."""
    peer_port = peer.port

    async def both(path: str) -> tuple[dict[str, object], dict[str, object]]:
        answers = []
        for port in (atrium_port, peer_port):
            status, body = await fetch(HOST, port, authorized(port, path, token))
            if status != 200:
                raise SystemExit(
                    f"GET {path} on port {port} answered {status}: {body[:200]!r}\n"
                    f"peer log:\n{log_tail(log_path)}"
                )
            answers.append(orjson.loads(body))
        return answers[0], answers[1]

    for path in (ME, PROJECTS):
        ours, theirs = trio.run(both, path)
        if path == ME:  # the same instant, formatted by orjson (atrium) or the peer's driver
            ours.pop("created_at"), theirs.pop("created_at")
        if ours != theirs:
            raise SystemExit(f"the peer's GET {path} differs from atrium's:\n{ours}\n{theirs}")


@dataclass(frozen=True, slots=True)
class Uncached:
    """atrium with both caches off, and the peer, on the same database."""

    atrium: dict[str, LoadResult]  # path -> result
    peer: dict[str, LoadResult]


def bench_uncached(
    args: argparse.Namespace, data_dir: Path, work: Path, secret: str, token: str
) -> Uncached:
    ours: dict[str, LoadResult] = {}
    theirs: dict[str, LoadResult] = {}
    with open_atrium(
        "atrium, caches off",
        data_dir,
        work / "atrium-uncached.log",
        timeout=START_TIMEOUT,
        note=" (SESSION_CACHE_SECONDS=0 PROJECT_CACHE_TTL_SECONDS=0, same database)",
        database_url=args.database_url,
        SECRET_KEY=secret,
        SESSION_CACHE_SECONDS="0",
        PROJECT_CACHE_TTL_SECONDS="0",
    ) as atrium:
        url = args.database_url or embedded_url(data_dir)
        with open_peer(url, secret, work) as peer:
            same_answers(atrium.port, peer, token, work / "peer.log")
            probes = atrium.probes()
            peer_probes = {**probes, "server": process_cpu(peer.process.pid)}
            for path in (ME, PROJECTS):
                request = authorized(atrium.port, path, token)
                result = run_load(atrium.port, request, args, probes)
                report(f"GET {path}, caches off", result)
                ours[path] = result
                request = authorized(peer.port, path, token)
                result = run_load(peer.port, request, args, peer_probes)
                report(f"peer: GET {path}", result)
                theirs[path] = result
    return Uncached(ours, theirs)


def bench_floor(args: argparse.Namespace, work: Path) -> Scenario:
    port = free_port(HOST)
    log_path = work / "floor.log"
    print(f"floor: python -m bench.hello_asgi --seam --port {port} (atrium's server)", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open_process(
        [sys.executable, "-m", "bench.hello_asgi", "--seam", "--host", HOST, "--port", str(port)],
        env=env,
        log_path=log_path,
        cwd=REPO,
    ) as server:
        with exit_if_not_started("the floor server", log_path):
            wait_http_ok(HOST, port, "/", server, timeout=START_TIMEOUT)
        name = "floor: bare ASGI"
        request = build_request("GET", "/", host=f"{HOST}:{port}")
        result = run_load(port, request, args, {"server": process_cpu(server.pid)})
        report(name, result)
    return Scenario(name, result, None)


def summary(cold_start: float, scenarios: list[Scenario], floor: Scenario) -> bool:
    """Print the table; True when every target is met."""
    print()
    print(
        f"{'scenario':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'x floor':>9}  {'target':<10}{'met':<5}{'srv us/req':>11}"
    )
    print("-" * 94)
    ok = cold_start < COLD_START_TARGET
    print(
        f"{'cold start':<22}{f'{cold_start:.2f} s':>9}{'':>35}  "
        f"{f'< {COLD_START_TARGET:.0f} s':<10}{'yes' if ok else 'NO':<5}"
    )
    for scenario in [*scenarios, floor]:
        result = scenario.result
        ratio = result.rate / floor.result.rate if floor.result.rate else math.nan
        cost = result.cpu_us_per_request()
        if scenario.target is None:
            target, met = "", ""
        else:
            hit = ratio >= scenario.target
            ok = ok and hit
            target, met = f">= {scenario.target:.1f}x", "yes" if hit else "NO"
        print(
            f"{scenario.name:<22}{result.rate:>9,.0f}{result.percentile_ms(50):>9.2f}"
            f"{result.percentile_ms(99):>9.2f}{result.errors:>8}{ratio:>8.2f}x  "
            f"{target:<10}{met:<5}{cost:>11.0f}"
        )
    return ok


def versus_peer(cached: Cached, uncached: Uncached) -> bool:
    """Print atrium beside the peer and the stampede check; True when every target is met."""
    print()
    print("atrium beside the peer (FastAPI + uvicorn, same database, no caches)")
    print(
        f"{'scenario':<34}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'srv us':>8}"
        f"{'peer req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'srv us':>8}{'us x':>7}"
        f"  {'target':<14}{'met':<4}"
    )
    print("-" * 137)
    ok = True
    rows: list[tuple[str, LoadResult, str, str]] = [
        (f"GET {ME}, default caches", cached.scenarios[1].result, ME, "rate"),
        (f"GET {ME}, caches off", uncached.atrium[ME], ME, "cost"),
        (f"GET {PROJECTS}, default caches", cached.projects, PROJECTS, ""),
        (f"GET {PROJECTS}, caches off", uncached.atrium[PROJECTS], PROJECTS, "cost"),
    ]
    for name, ours, path, kind in rows:
        theirs = uncached.peer[path]
        cost = ours.cpu_us_per_request() / theirs.cpu_us_per_request()
        if kind == "cost":
            hit = cost <= PEER_COST_TARGET
            target = f"us <= {PEER_COST_TARGET}x"
        elif kind == "rate":
            hit = ours.rate >= theirs.rate
            target = "req/s >= peer"
        else:
            hit, target = True, ""
        ok = ok and hit
        print(
            f"{name:<34}{ours.rate:>8,.0f}{ours.percentile_ms(50):>9.2f}"
            f"{ours.percentile_ms(99):>9.2f}{max_ms(ours):>9.2f}{ours.cpu_us_per_request():>8.0f}"
            f"{theirs.rate:>11,.0f}{theirs.percentile_ms(50):>9.2f}"
            f"{theirs.percentile_ms(99):>9.2f}{theirs.cpu_us_per_request():>8.0f}{cost:>6.2f}x"
            f"  {target:<14}{('yes' if hit else 'NO') if target else '':<4}"
        )
    stampede = cached.stampede
    if stampede is not None:
        p50, p99, slowest = stampede.percentile_ms(50), stampede.percentile_ms(99), max_ms(stampede)
        stalls = slowest < STALL_MAX_MS and p99 <= STALL_P99_OVER_P50 * p50
        stalled = sum(1 for latency in stampede.latencies if latency * 1000 >= STALL_MAX_MS)
        ok = ok and stalls
        print(
            f"\nGET {ME}, default caches, {stampede.wall_seconds:.0f} s: {stampede.rate:,.0f} req/s"
            f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms ({p99 / p50:.2f}x p50)  max {slowest:.2f} ms"
            f"  {stalled} of {stampede.completed:,} took >= {STALL_MAX_MS:.0f} ms"
            f"  | target: max < {STALL_MAX_MS:.0f} ms and p99 <= {STALL_P99_OVER_P50}x p50:"
            f" {'yes' if stalls else 'NO'}"
        )
    return ok


def figures(cached: Cached, uncached: Uncached, floor: Scenario, connections: int) -> list[Figure]:
    """The side-by-side figures of this run (bench/_figures.py), for bench/sidebyside.py."""
    peer = "FastAPI + uvicorn"
    cost = f"server CPU a request, {connections} connections"
    on_peer = f"at most {PEER_COST_TARGET}x the peer"
    health, me = (scenario.result for scenario in cached.scenarios)

    def beside_peer(what: str, ours: LoadResult, path: str, target: str = "") -> Figure:
        theirs = Value(peer, uncached.peer[path].cpu_us_per_request())
        return Figure(what, "µs", [Value("", ours.cpu_us_per_request())], [theirs], target=target)

    return [
        Figure(
            f"`GET /health`: {cost}",
            "µs",
            [Value("", health.cpu_us_per_request())],
            [Value("bare ASGI app, hypercorn trio worker", floor.result.cpu_us_per_request())],
        ),
        beside_peer(f"`GET {ME}`, caches off: {cost}", uncached.atrium[ME], ME, on_peer),
        beside_peer(f"`GET {ME}`, default caches: {cost}", me, ME),
        beside_peer(
            f"`GET {PROJECTS}`, caches off: {cost}", uncached.atrium[PROJECTS], PROJECTS, on_peer
        ),
        beside_peer(f"`GET {PROJECTS}`, default caches: {cost}", cached.projects, PROJECTS),
        Figure(
            f"`GET {ME}`, default caches: requests/s",
            "req/s",
            [Value("", me.rate)],
            [
                Value(peer, uncached.peer[ME].rate),
                Value("bare ASGI app, hypercorn trio worker", floor.result.rate),
            ],
            "higher",
            "req/s at least the peer's",
        ),
    ]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_run_header(args)
    secret = secrets.token_urlsafe(48)  # atrium's and the peer's, so both accept the token
    with contextlib.ExitStack() as stack:
        if args.database_url:
            args.database_url = stack.enter_context(dedicated_database(args.database_url))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atrium-bench-")))
        data_dir = work / "atrium"
        cached = bench_atrium(args, data_dir, work, secret)
        uncached = bench_uncached(args, data_dir, work, secret, cached.token)
        floor = bench_floor(args, work)
    print_load_average("after")
    met = summary(cached.cold_start, cached.scenarios, floor)
    met = versus_peer(cached, uncached) and met
    print("\nall targets met" if met else "\nsome targets missed")
    if args.json:
        write_figures(args.json, figures(cached, uncached, floor, args.connections))
    return 0 if met else 1


if __name__ == "__main__":
    run_script(main)
