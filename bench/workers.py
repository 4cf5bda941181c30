"""``run.py --workers 2`` against one process: authenticated requests/s on one machine.

    python bench/workers.py [--workers 2] [--duration 10] [--connections 64] [--warmup 2]

Issue 13's benchmark part (c) (parts a and b are bench/cluster.py). In one run, on one
data directory (embedded PostgreSQL, so both servers see the same user and session):

1. ``python run.py`` (one process): sign a user up, then ``GET /api/v1/auth/me`` with its
   bearer token, back to back on ``--connections`` keep-alive connections;
2. ``python run.py --workers N`` on the same data directory and key (the supervisor starts
   the embedded PostgreSQL and an embedded Redis once, then N serving processes sharing
   the port): the same requests from the same client;
3. the ratio of the two request rates, and where the CPU went during each measured
   window: the client, each serving process, the supervisor, Redis and PostgreSQL (CPU
   seconds over wall seconds), and the serving processes' CPU per request.

Default settings otherwise (SESSION_CACHE_SECONDS=5: most requests verify the token and
read the session from the process's cache), with rate limits lifted. On a machine with
fewer cores than workers + client + PostgreSQL, the ratio is capped by the cores, not by
atrium: read the CPU shares and the load average printed before and after.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path (bench/http.py would shadow the
# standard library's ``http``); the repository root is what we want there.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import psutil  # noqa: E402
import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    REPO,
    CpuProbe,
    LoadResult,
    add_load_options,
    atrium_env,
    build_request,
    exit_if_not_started,
    free_port,
    log_tail,
    open_atrium,
    open_process,
    postgres_probe,
    print_load_average,
    print_report,
    print_run_header,
    process_cpu,
    run_load,
    run_script,
    sign_up,
    stop_embedded_postgres,
    wait_http_ok,
)

ME = "/api/v1/auth/me"
START_TIMEOUT = 90.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/workers.py",
        description="GET /api/v1/auth/me requests/s: run.py --workers N against one process.",
    )
    add_load_options(parser)
    parser.set_defaults(connections=64, warmup=2.0)
    parser.add_argument(
        "--workers", type=int, default=2, help="serving processes of the group (default 2)"
    )
    return parser.parse_args(argv)


def me_request(port: int, token: str) -> bytes:
    return build_request(
        "GET", ME, host=f"{HOST}:{port}", headers={"Authorization": f"Bearer {token}"}
    )


def report(name: str, result: LoadResult, serving: list[str]) -> None:
    """One line of rate and latency, one of CPU shares, one of serving CPU per request."""
    print_report(
        result,
        f"  {name}: {result.rate:,.0f} req/s  p50 {result.percentile_ms(50):.2f} ms"
        f"  p99 {result.percentile_ms(99):.2f} ms  errors {result.errors}",
    )
    print(f"    CPU/wall: {result.cpu_shares()}")
    if result.completed:
        per_request = sum(result.cpu[name] for name in serving) * result.wall_seconds
        print(
            f"    serving CPU per request: {per_request / result.completed * 1e6:.0f} us"
            f" (sum of {', '.join(serving)})"
        )
    busy = sum(result.cpu.values())
    print(f"    all probed CPU: {busy:.2f} of {os.cpu_count()} cores", flush=True)


def group_probes(supervisor: int, data_dir: Path) -> dict[str, CpuProbe]:
    """Probes for the supervisor, each serving process, Redis and PostgreSQL of a group."""
    probes: dict[str, CpuProbe] = {"supervisor": process_cpu(supervisor)}
    workers = 0
    for child in psutil.Process(supervisor).children(recursive=True):
        command = " ".join(child.cmdline())
        if "--supervised" in command:
            workers += 1
            probes[f"worker-{workers}"] = process_cpu(child.pid)
        elif "redis-server" in child.name():
            probes["redis"] = process_cpu(child.pid)
    postgres = postgres_probe(data_dir)
    if postgres is not None:
        probes["postgres"] = postgres
    return probes


@contextlib.contextmanager
def open_group(
    data_dir: Path, log_path: Path, workers: int, secret: str
) -> Iterator[tuple[int, int]]:
    """Run ``python run.py --workers N`` on a free port for the block; yield the
    supervisor's pid and the port once it reports every worker serving ("API on")."""
    port = free_port(HOST)
    env = atrium_env(port, data_dir, SECRET_KEY=secret, METRICS_PORT="0")
    print(f"group: python run.py --workers {workers} --port {port} --data-dir {data_dir}")
    argv = [sys.executable, "run.py", "--workers", str(workers)]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    with (
        stop_embedded_postgres(data_dir),
        open_process(argv, env=env, log_path=log_path, cwd=REPO) as process,
        exit_if_not_started("run.py --workers", log_path),
    ):
        deadline = time.monotonic() + START_TIMEOUT
        while "atrium: API on " not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"not serving:\n{log_tail(log_path)}")
            time.sleep(0.05)
        wait_http_ok(HOST, port, "/health", process, timeout=START_TIMEOUT)
        yield process.pid, port


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_run_header(args)
    secret = secrets.token_urlsafe(48)
    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        work = Path(tmp)
        data_dir = work / "atrium"
        with open_atrium(
            "one process",
            data_dir,
            work / "one.log",
            timeout=START_TIMEOUT,
            SECRET_KEY=secret,
            METRICS_PORT="0",  # 9090 may be taken by another server on the machine
        ) as one:
            token = trio.run(sign_up, one.port)
            single = run_load(one.port, me_request(one.port, token), args, one.probes())
        report(f"one process, GET {ME}", single, ["server"])
        with open_group(data_dir, work / "group.log", args.workers, secret) as (supervisor, port):
            probes = group_probes(supervisor, data_dir)
            group = run_load(port, me_request(port, token), args, probes)
        workers = [name for name in probes if name.startswith("worker-")]
        report(f"--workers {args.workers}, GET {ME}", group, workers)
    print_load_average("after")
    print(
        f"\nratio --workers {args.workers} / one process: {group.rate / single.rate:.2f}"
        f" ({group.rate:,.0f} / {single.rate:,.0f} req/s)"
    )
    return 0


if __name__ == "__main__":
    run_script(main)
