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
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import orjson  # noqa: E402
import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    LoadResult,
    add_load_options,
    api_request,
    build_request,
    fetch,
    open_atrium,
    print_load_average,
    print_report,
    print_run_header,
    run_load,
    run_script,
    sign_up,
)

START_TIMEOUT = 90.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/projects.py", description=__doc__.split("\n")[0])
    add_load_options(parser)
    parser.add_argument(
        "--projects", type=int, default=50, help="projects the benchmark user owns (default 50)"
    )
    return parser.parse_args(argv)


async def call(
    port: int, method: str, path: str, token: str | None, body: object = None
) -> tuple[int, object]:
    status, raw = await fetch(HOST, port, api_request(method, path, port, body, token))
    return status, (orjson.loads(raw) if raw else None)


async def set_up(port: int, projects: int) -> str:
    """A fresh user owning ``projects`` projects; returns its access token."""
    token = await sign_up(port)
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
    print_report(
        result,
        f"  {name:<34} {result.rate:>7,.0f} req/s  p50 {result.percentile_ms(50):6.2f} ms"
        f"  p99 {result.percentile_ms(99):6.2f} ms  errors {result.errors}"
        f"  server {result.cpu_us_per_request():,.0f} us/req  | CPU/wall: {result.cpu_shares()}",
    )


def run_server(
    args: argparse.Namespace, data_dir: Path, log_path: Path, ttl: int
) -> list[tuple[str, LoadResult]]:
    label = f"cache {'on, TTL ' + str(ttl) + ' s' if ttl else 'off'}"
    results = []
    with open_atrium(
        label, data_dir, log_path, timeout=START_TIMEOUT, PROJECT_CACHE_TTL_SECONDS=str(ttl)
    ) as atrium:
        port = atrium.port
        token = trio.run(set_up, port, args.projects)
        probes = atrium.probes()
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
            result = run_load(port, request, args, probes)
            report(name, result)
            results.append((f"{label}: {name}", result))
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_run_header(args, f"{args.projects} projects; ")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atrium-bench-projects-") as tmp:
        work = Path(tmp)
        results = run_server(args, work / "atrium", work / "cached.log", ttl=60)
        results += run_server(args, work / "atrium", work / "uncached.log", ttl=0)
    print_load_average("after")
    print(f"\n{'scenario':<68}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, result in results:
        print(
            f"{name:<68}{result.rate:>9,.0f}{result.percentile_ms(50):>9.2f}"
            f"{result.percentile_ms(99):>9.2f}{result.errors:>8}"
        )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    run_script(main)
