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
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    REPO,
    LoadResult,
    add_load_options,
    build_request,
    exit_if_not_started,
    free_port,
    open_atrium,
    open_process,
    print_load_average,
    print_report,
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
    parser.add_argument(
        "--database-url", help="an existing PostgreSQL (default: embedded, in a temp data dir)"
    )
    return parser.parse_args(argv)


def report(name: str, result: LoadResult) -> None:
    print_report(
        result,
        f"  {name}: {result.rate:,.0f} req/s  p50 {result.percentile_ms(50):.2f} ms"
        f"  p99 {result.percentile_ms(99):.2f} ms  errors {result.errors}"
        f"  | CPU/wall: {result.cpu_shares()}",
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


def bench_atrium(args: argparse.Namespace, work: Path) -> tuple[float, list[Scenario]]:
    note = f" ({'DATABASE_URL given' if args.database_url else 'embedded PostgreSQL'})"
    with open_atrium(
        "atrium",
        work / "atrium",
        work / "atrium.log",
        timeout=START_TIMEOUT,
        note=note,
        database_url=args.database_url,
    ) as atrium:
        cold_start = atrium.cold_start
        print(f"  cold start: {cold_start:.2f} s (process start to GET /health 200)", flush=True)
        token = trio.run(sign_up, atrium.port)
        probes = atrium.probes()
        host = f"{HOST}:{atrium.port}"
        scenarios = []
        for name, request, target in (
            ("GET /health", build_request("GET", "/health", host=host), HEALTH_TARGET),
            (
                "GET /api/v1/auth/me",
                build_request(
                    "GET",
                    "/api/v1/auth/me",
                    host=host,
                    headers={"Authorization": f"Bearer {token}"},
                ),
                ME_TARGET,
            ),
        ):
            result = run_load(atrium.port, request, args, probes)
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


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(
        f"{args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s"
        f" measured per scenario; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
        flush=True,
    )
    print_load_average("before")
    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        work = Path(tmp)
        cold_start, scenarios = bench_atrium(args, work)
        floor = bench_floor(args, work)
    print_load_average("after")
    met = summary(cold_start, scenarios, floor)
    print("\nall targets met" if met else "\nsome targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    run_script(main)
