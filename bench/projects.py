"""Project-list benchmark: ``GET /api/v1/projects/`` with the per-user cache warm, and off.

    python bench/projects.py [--duration 10] [--connections 32] [--projects 50]

Starts ``python run.py`` (embedded PostgreSQL in a temporary data directory, rate limits
lifted), signs up one user, creates ``--projects`` projects, and loads the authenticated
list (the default page of 20, and one page of every project) from keep-alive connections:

1. with the cache on (PROJECT_CACHE_TTL_SECONDS=60, the seed's TTL): every request after
   the first per page is a cache hit;
2. with the cache off (PROJECT_CACHE_TTL_SECONDS=0, a second server on the same data
   directory): every request queries PostgreSQL.

Prints req/s, p50/p99 latency and CPU per request for each.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path; the repository root is needed.
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import orjson  # noqa: E402
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
START_TIMEOUT = 90.0
NO_LIMIT = "100000000"
_ATRIUM_VARIABLES = (
    "ACCESS_TOKEN_EXPIRE_MINUTES",
    "ADMIN_TOKEN",
    "ALLOWED_ORIGINS",
    "AUTH_RATE_LIMIT_PER_MINUTE",
    "DATABASE_URL",
    "DATA_DIR",
    "DB_POOL_SIZE",
    "ENVIRONMENT",
    "HOST",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "LOG_LEVEL",
    "MAX_BODY_BYTES",
    "PORT",
    "PROJECT_CACHE_TTL_SECONDS",
    "RATE_LIMIT_PER_MINUTE",
    "REDIS_URL",
    "REFRESH_TOKEN_EXPIRE_DAYS",
    "SECRET_KEY",
    "WS_PORT",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/projects.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds of load before each scenario (default 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)"
    )
    parser.add_argument(
        "--projects", type=int, default=50, help="projects the benchmark user owns (default 50)"
    )
    return parser.parse_args(argv)


async def call(
    port: int, method: str, path: str, token: str | None, body: object = None
) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = b"" if body is None else orjson.dumps(body)
    status, raw = await fetch(
        HOST,
        port,
        build_request(method, path, host=f"{HOST}:{port}", headers=headers, body=payload),
    )
    return status, (orjson.loads(raw) if raw else None)


async def set_up(port: int, projects: int) -> str:
    """A fresh user owning ``projects`` projects; returns its access token."""
    credentials = {
        "email": f"bench-{uuid.uuid4().hex[:12]}@example.com",
        "password": "bench-Passw0rd!",
    }
    status, _ = await call(port, "POST", "/api/v1/auth/signup", None, credentials)
    assert status == 201, status
    status, body = await call(port, "POST", "/api/v1/auth/login", None, credentials)
    assert status == 200 and isinstance(body, dict), status
    token = str(body["access_token"])
    for i in range(projects):
        status, _ = await call(
            port,
            "POST",
            "/api/v1/projects/",
            token,
            {"name": f"Project {i}", "description": "x" * 80},
        )
        assert status == 201, status
    return token


def report(name: str, result: LoadResult) -> None:
    server_us = result.cpu["server"] * result.wall_seconds / max(result.completed, 1) * 1e6
    cpu = "  ".join(f"{k} {v:.0%}" for k, v in result.cpu.items())
    print(
        f"  {name:<34} {result.rate:>7,.0f} req/s  p50 {result.percentile_ms(50):6.2f} ms"
        f"  p99 {result.percentile_ms(99):6.2f} ms  errors {result.errors}"
        f"  server {server_us:,.0f} us/req  | CPU/wall: {cpu}",
        flush=True,
    )
    if result.error_kinds:
        print(f"    errors by kind: {dict(result.error_kinds)}")


def run_server(
    args: argparse.Namespace, data_dir: Path, log_path: Path, ttl: int
) -> list[tuple[str, LoadResult]]:
    port = free_port(HOST)
    env = {k: v for k, v in os.environ.items() if k not in _ATRIUM_VARIABLES}
    env.update(
        ENVIRONMENT="development",
        PORT=str(port),
        DATA_DIR=str(data_dir),
        WS_PORT="0",
        LOG_LEVEL="WARNING",
        RATE_LIMIT_PER_MINUTE=NO_LIMIT,
        AUTH_RATE_LIMIT_PER_MINUTE=NO_LIMIT,
        PROJECT_CACHE_TTL_SECONDS=str(ttl),
    )
    label = f"cache {'on, TTL ' + str(ttl) + ' s' if ttl else 'off'}"
    print(f"{label}: python run.py --port {port} --data-dir {data_dir}", flush=True)
    results = []
    with open_process(
        [sys.executable, "run.py", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        log_path=log_path,
        cwd=REPO,
    ) as server:
        try:
            wait_http_ok(HOST, port, "/health", server, timeout=START_TIMEOUT)
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(f"atrium did not start: {error}\n{log_tail(log_path)}") from None
        token = trio.run(set_up, port, args.projects)
        probes: dict[str, CpuProbe] = {"server": process_cpu(server.pid)}
        pid_file = data_dir / "pg" / "postmaster.pid"
        if pid_file.exists():
            probes["postgres"] = process_tree_cpu(int(pid_file.read_text().split()[0]))
        paths = ["/api/v1/projects/", "/api/v1/projects/?limit=100"]
        if ttl:  # the floor under any authenticated route: token, session lookup, rate limit
            paths.insert(0, "/api/v1/auth/me")
        for path in paths:
            name = f"GET {path}"
            if path.startswith("/api/v1/projects"):
                # Check what the load will get: the right page, and the cache doing its part.
                for attempt in range(2):
                    status, body = trio.run(call, port, "GET", path, token)
                    assert status == 200 and isinstance(body, dict), status
                    assert body["total"] == args.projects, body["total"]
                    assert body["cached"] == bool(ttl and attempt), body["cached"]
                name += f" ({len(body['projects'])} items)"
            request = build_request(
                "GET", path, host=f"{HOST}:{port}", headers={"Authorization": f"Bearer {token}"}
            )
            result = trio.run(
                lambda request=request: run_http_load(
                    HOST,
                    port,
                    request,
                    connections=args.connections,
                    duration=args.duration,
                    warmup=args.warmup,
                    probes=probes,
                )
            )
            report(name, result)
            results.append((f"{label}: {name}", result))
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(
        f"{args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s"
        f" measured per scenario; {args.projects} projects; {os.cpu_count()} CPUs;"
        f" Python {sys.version.split()[0]}",
        flush=True,
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atrium-bench-projects-") as tmp:
        work = Path(tmp)
        results = run_server(args, work / "atrium", work / "cached.log", ttl=60)
        results += run_server(args, work / "atrium", work / "uncached.log", ttl=0)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    print(f"\n{'scenario':<68}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, result in results:
        print(
            f"{name:<68}{result.rate:>9,.0f}{result.percentile_ms(50):>9.2f}"
            f"{result.percentile_ms(99):>9.2f}{result.errors:>8}"
        )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
