"""HTTP benchmark: atrium's cold start and request rate against the floor of its stack.

    python bench/http.py [--duration 10] [--connections 32] [--database-url URL]

1. cold start: ``run.py`` on a fresh data directory (embedded PostgreSQL initialised from
   nothing, unless --database-url) until ``GET /health`` answers 200;
2. ``GET /health`` and an authenticated ``GET /api/v1/auth/me`` on that server;
3. the same load on a bare ASGI app under hypercorn's trio worker (bench/hello_asgi.py);
4. a summary with the ratios to that floor and the targets. Exit status 1 if one is missed.

Each server is its own process (one core at most, the GIL); this client runs alongside and
reports its own CPU use so a reader can check it was not the bottleneck.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path and this file would shadow the
# standard library's ``http`` package; the repository root is what we want there.
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import orjson  # noqa: E402
import psutil  # noqa: E402
import trio  # noqa: E402

from bench._load import (  # noqa: E402
    CpuProbe,
    LoadResult,
    build_request,
    fetch,
    free_port,
    log_tail,
    open_process,
    process_cpu,
    process_tree_cpu,
    run_http_load,
    wait_http_ok,
)

HOST = "127.0.0.1"
COLD_START_TARGET = 5.0
START_TIMEOUT = 60.0
HEALTH_TARGET = 0.8
ME_TARGET = 0.6
NO_LIMIT = "100000000"

# Everything atrium reads from the environment: the bench sets what it needs, nothing leaks.
_ATRIUM_VARIABLES = (
    "ACCESS_TOKEN_EXPIRE_MINUTES", "ADMIN_TOKEN", "ALLOWED_ORIGINS", "AUTH_RATE_LIMIT_PER_MINUTE",
    "DATABASE_URL", "DATA_DIR", "DB_POOL_SIZE", "ENVIRONMENT", "HOST", "JWT_AUDIENCE",
    "JWT_ISSUER", "LOG_LEVEL", "MAX_BODY_BYTES", "PORT", "PROJECT_CACHE_TTL_SECONDS",
    "RATE_LIMIT_PER_MINUTE", "REDIS_URL", "REFRESH_TOKEN_EXPIRE_DAYS", "SECRET_KEY", "WS_PORT",
)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    result: LoadResult
    target: float | None  # minimum ratio to the floor


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/http.py", description="atrium HTTP benchmark (cold start, req/s, latency)."
    )
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per scenario (default 10)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds of load before each scenario (default 1)")
    parser.add_argument("--database-url",
                        help="an existing PostgreSQL (default: embedded, in a temp data dir)")
    return parser.parse_args(argv)


def atrium_env(port: int, data_dir: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ATRIUM_VARIABLES}
    env.update(
        ENVIRONMENT="development",
        PORT=str(port),
        DATA_DIR=str(data_dir),
        WS_PORT="0",
        LOG_LEVEL="WARNING",
        RATE_LIMIT_PER_MINUTE=NO_LIMIT,
        AUTH_RATE_LIMIT_PER_MINUTE=NO_LIMIT,
    )
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def postgres_probe(data_dir: Path) -> CpuProbe | None:
    """The embedded postmaster and its backends, found through its pid file."""
    pid_file = data_dir / "pg" / "postmaster.pid"
    try:
        return process_tree_cpu(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def stop_embedded_postgres(data_dir: Path) -> Iterator[None]:
    """After the block, stop a postmaster that outlived run.py (killed, not shut down).

    pg_ctl detaches PostgreSQL from our session, so killing run.py's session misses it.
    """
    try:
        yield
    finally:
        pid_file = data_dir / "pg" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            if postmaster.name().startswith("postgres"):  # not a stale pid reused since
                postmaster.send_signal(signal.SIGQUIT)  # PostgreSQL's immediate shutdown


async def log_in(port: int) -> str:
    """Sign up and log in a fresh user; return its access token."""
    host = f"{HOST}:{port}"
    credentials = orjson.dumps(
        {"email": f"bench-{uuid.uuid4().hex[:12]}@example.com", "password": "bench-Passw0rd!"}
    )
    headers = {"Content-Type": "application/json"}
    status, body = await fetch(HOST, port, build_request(
        "POST", "/api/v1/auth/signup", host=host, headers=headers, body=credentials))
    if status != 201:
        raise RuntimeError(f"signup answered {status}: {body[:200]!r}")
    status, body = await fetch(HOST, port, build_request(
        "POST", "/api/v1/auth/login", host=host, headers=headers, body=credentials))
    if status != 200:
        raise RuntimeError(f"login answered {status}: {body[:200]!r}")
    return str(orjson.loads(body)["access_token"])


def load(
    port: int, request: bytes, args: argparse.Namespace, probes: dict[str, CpuProbe]
) -> LoadResult:
    return trio.run(lambda: run_http_load(
        HOST, port, request, connections=args.connections, duration=args.duration,
        warmup=args.warmup, probes=probes,
    ))


def cpu_per_request_us(result: LoadResult) -> float:
    """Server CPU microseconds per request: the cost, whatever else ran on the machine."""
    return result.cpu["server"] * result.wall_seconds / result.completed * 1e6


def report(name: str, result: LoadResult) -> None:
    cpu = "  ".join(f"{k} {v:.0%}" for k, v in result.cpu.items())
    print(f"  {name}: {result.rate:,.0f} req/s  p50 {result.percentile_ms(50):.2f} ms"
          f"  p99 {result.percentile_ms(99):.2f} ms  errors {result.errors}"
          f"  | CPU/wall: {cpu}", flush=True)
    if result.error_kinds:
        print(f"    errors by kind: {dict(result.error_kinds)}")
    if "server" in result.cpu and result.completed:
        print(f"    server CPU per request: {cpu_per_request_us(result):.0f} us")
    if result.cpu["client"] > 0.8:
        print("    warning: the client used >80% of a core; it may be the bottleneck")
    if result.cpu.get("server", 1.0) < 0.9:
        print("    warning: the server used <90% of a core: other processes took the CPU (see"
              " the load average) or the client held it back; req/s is understated")


def bench_atrium(args: argparse.Namespace, work: Path) -> tuple[float, list[Scenario]]:
    port = free_port(HOST)
    data_dir = work / "atrium"
    log_path = work / "atrium.log"
    env = atrium_env(port, data_dir, args.database_url)
    print(f"atrium: python run.py --port {port} --data-dir {data_dir}"
          f" ({'DATABASE_URL given' if args.database_url else 'embedded PostgreSQL'})", flush=True)
    with stop_embedded_postgres(data_dir), open_process(
        [sys.executable, "run.py", "--port", str(port), "--data-dir", str(data_dir)],
        env=env, log_path=log_path, cwd=REPO,
    ) as server:
        started = time.perf_counter()
        try:
            wait_http_ok(HOST, port, "/health", server, timeout=START_TIMEOUT)
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(f"atrium did not start: {error}\n{log_tail(log_path)}") from None
        cold_start = time.perf_counter() - started
        print(f"  cold start: {cold_start:.2f} s (process start to GET /health 200)", flush=True)

        token = trio.run(log_in, port)
        probes = {"server": process_cpu(server.pid)}
        postgres = None if args.database_url else postgres_probe(data_dir)
        if postgres is not None:
            probes["postgres"] = postgres
        host = f"{HOST}:{port}"
        scenarios = []
        for name, request, target in (
            ("GET /health", build_request("GET", "/health", host=host), HEALTH_TARGET),
            ("GET /api/v1/auth/me", build_request(
                "GET", "/api/v1/auth/me", host=host,
                headers={"Authorization": f"Bearer {token}"}), ME_TARGET),
        ):
            result = load(port, request, args, probes)
            report(name, result)
            scenarios.append(Scenario(name, result, target))
    return cold_start, scenarios


def bench_floor(args: argparse.Namespace, work: Path) -> Scenario:
    port = free_port(HOST)
    log_path = work / "floor.log"
    print(f"floor: python -m bench.hello_asgi --port {port} (hypercorn trio worker)", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open_process(
        [sys.executable, "-m", "bench.hello_asgi", "--host", HOST, "--port", str(port)],
        env=env, log_path=log_path, cwd=REPO,
    ) as server:
        try:
            wait_http_ok(HOST, port, "/", server, timeout=START_TIMEOUT)
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(
                f"the floor server did not start: {error}\n{log_tail(log_path)}") from None
        name = "floor: bare ASGI"
        result = load(port, build_request("GET", "/", host=f"{HOST}:{port}"), args,
                      {"server": process_cpu(server.pid)})
        report(name, result)
    return Scenario(name, result, None)


def summary(cold_start: float, scenarios: list[Scenario], floor: Scenario) -> bool:
    """Print the table; True when every target is met."""
    print()
    print(f"{'scenario':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'x floor':>9}  {'target':<10}{'met':<5}{'srv us/req':>11}")
    print("-" * 94)
    ok = cold_start < COLD_START_TARGET
    print(f"{'cold start':<22}{f'{cold_start:.2f} s':>9}{'':>35}  "
          f"{f'< {COLD_START_TARGET:.0f} s':<10}{'yes' if ok else 'NO':<5}")
    for scenario in [*scenarios, floor]:
        result = scenario.result
        ratio = result.rate / floor.result.rate if floor.result.rate else math.nan
        cost = cpu_per_request_us(result) if result.completed else math.nan
        if scenario.target is None:
            target, met = "", ""
        else:
            hit = ratio >= scenario.target
            ok = ok and hit
            target, met = f">= {scenario.target:.1f}x", "yes" if hit else "NO"
        print(f"{scenario.name:<22}{result.rate:>9,.0f}{result.percentile_ms(50):>9.2f}"
              f"{result.percentile_ms(99):>9.2f}{result.errors:>8}{ratio:>8.2f}x  "
              f"{target:<10}{met:<5}{cost:>11.0f}")
    return ok


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"{args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s"
          f" measured per scenario; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
          flush=True)
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        work = Path(tmp)
        cold_start, scenarios = bench_atrium(args, work)
        floor = bench_floor(args, work)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    met = summary(cold_start, scenarios, floor)
    print("\nall targets met" if met else "\nsome targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except* KeyboardInterrupt:  # trio's nurseries deliver it inside an exception group
        print("\ninterrupted; servers stopped", file=sys.stderr)
        status = 130
    sys.exit(status)
