"""The HTTP floor, side by side in one run: atrium's CPU per request beside the peers'.

    python bench/http_floor.py [--duration 4] [--rounds 3] [--connections 32]
                               [--projects 50] [--pin SERVER_CPU,CLIENT_CPU]

Every server runs at once, each its own process; the scenarios are measured in turn,
round after round, so a change in what else runs on the machine touches them all alike,
and the figure of each is its median over ``--rounds``. Measured: server CPU time per
request (user + system), which holds whatever else shares the machine (req/s does not).

- ``hello, uvicorn``: the bare ASGI app of bench/hello_asgi.py on uvicorn with uvloop and
  httptools (``pip install 'uvicorn[standard]'``), the cheapest Python HTTP floor;
- ``hello, hypercorn trio``: the same app on hypercorn's own trio worker;
- ``hello, atrium's seam``: the same app on ``atrium.seams.hypercorn_server``, the worker
  atrium runs; ``, httptools``: with its llhttp protocol (``HTTP_PARSER=httptools``);
- ``atrium /health``, ``/api/v1/auth/me`` and ``/api/v1/projects/``: ``run.py`` with both
  caches off (SESSION_CACHE_SECONDS=0, PROJECT_CACHE_TTL_SECONDS=0, embedded PostgreSQL)
  and ``HTTP_PARSER=h11``,
  for a user owning ``--projects`` projects;
- ``atrium(httptools)``: a second ``run.py`` on the same database with
  ``HTTP_PARSER=httptools``, for the same three routes;
- ``peer``: the FastAPI + uvicorn peer (bench/peer_fastapi.py) doing the same work on the
  same database, for the same two API routes.

Targets (issue 24): ``/health`` at most 9x the hello app's CPU on uvicorn, ``/auth/me``
at most the peer's. Exit status 1 when one is missed.

With ``--profile``, after the rounds, each of hypercorn's hello, the seam's hello, atrium's
``/health`` and ``/auth/me`` and the peer's ``/auth/me`` is sampled once more under the
same load by py-spy (``pip install py-spy``; not a dependency), and a table puts each
sample in the bucket of its innermost frame (trio, h11, hypercorn and the seam, the
database crossing, atrium, ...): where a request's time goes, in proportions.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    REPO,
    CpuProbe,
    add_load_options,
    build_request,
    exit_if_not_started,
    free_port,
    open_atrium,
    open_process,
    print_load_average,
    print_run_header,
    process_cpu,
    run_load,
    run_script,
    wait_http_ok,
)
from bench.http import (  # noqa: E402
    ME,
    PROJECTS,
    authorized,
    embedded_url,
    open_peer,
    same_answers,
    set_up,
)

HEALTH_OVER_HELLO = 9.0  # atrium /health at most this x the hello app on uvicorn
ME_OVER_PEER = 1.0  # atrium /auth/me (caches off) at most this x the peer's
START_TIMEOUT = 60.0


@dataclass(slots=True)
class Scenario:
    name: str
    port: int
    request: bytes
    probes: dict[str, CpuProbe]
    pid: int  # the server's process
    costs: list[float] = field(default_factory=list)  # server us/request, one per round
    rates: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)  # server CPU / wall

    @property
    def cost(self) -> float:
        return statistics.median(self.costs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/http_floor.py", description=__doc__.split("\n")[0])
    add_load_options(parser)
    parser.set_defaults(duration=4.0, connections=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (3)")
    parser.add_argument(
        "--projects", type=int, default=50, help="projects the benchmark user owns (50)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then sample the servers with py-spy and print where the time goes",
    )
    parser.add_argument(
        "--pin",
        help="SERVER_CPU,CLIENT_CPU: pin the servers to one CPU and this client to another",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def open_hello(label: str, argv: list[str], work: Path) -> Iterator[tuple[int, int]]:
    """The hello app under ``argv`` (``{port}`` filled in); yields (port, pid)."""
    port = free_port(HOST)
    argv = [a.format(port=port) for a in argv]
    log_path = work / f"{label.replace(' ', '-')}.log"
    print(f"{label}: {' '.join(argv[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open_process([sys.executable, *argv], env=env, log_path=log_path, cwd=REPO) as server:
        with exit_if_not_started(label, log_path):
            wait_http_ok(HOST, port, "/", server, timeout=START_TIMEOUT)
        yield port, server.pid


HELLO = {
    "hello, uvicorn": [
        "-m", "uvicorn", "bench.hello_asgi:app", "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--host", HOST, "--port", "{port}",
    ],
    "hello, hypercorn trio": ["-m", "bench.hello_asgi", "--host", HOST, "--port", "{port}"],
    "hello, atrium's seam": [
        "-m", "bench.hello_asgi", "--seam", "--host", HOST, "--port", "{port}",
    ],
    "hello, atrium's seam, httptools": [
        "-m", "bench.hello_asgi", "--seam", "--parser", "httptools",
        "--host", HOST, "--port", "{port}",
    ],
}  # fmt: skip
HTTPTOOLS = "atrium(httptools)"  # atrium with HTTP_PARSER=httptools, on the same database


def pin(pid: int, cpu: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, {cpu})


def measure(args: argparse.Namespace, scenarios: list[Scenario]) -> None:
    for round_ in range(args.rounds):
        for scenario in scenarios:
            result = run_load(scenario.port, scenario.request, args, scenario.probes)
            scenario.costs.append(result.cpu_us_per_request())
            scenario.rates.append(result.rate)
            scenario.shares.append(result.cpu["server"])
            print(
                f"  round {round_ + 1} {scenario.name}: {result.rate:,.0f} req/s,"
                f" {result.cpu_us_per_request():.0f} us/req, errors {result.errors}"
                f" | CPU/wall: {result.cpu_shares()}",
                flush=True,
            )


PROFILED = (
    "hello, hypercorn trio",
    "hello, atrium's seam",
    "atrium /health",
    f"atrium {ME}",
    f"peer {ME}",
)

# A sample's bucket: the first expression that matches its innermost Python frame's
# "function (file:line)", in this order (time in C, system calls included, is its caller's).
BUCKETS = (
    ("socket I/O: trio's wrappers, the calls under them", r"trio/_(highlevel_)?socket\.py"),
    ("database: asyncpg, trio-asyncio, atrium's loop", r"asyncpg|trio_asyncio|aio_loop|persist"),
    ("h11: HTTP/1.1 parsing, writing, its states", r"/h11/"),
    ("hypercorn and atrium's seam of it", r"/hypercorn/|seams/hypercorn_server"),
    ("trio: scheduler, tasks, cancel scopes, epoll", r"/trio/"),
    ("asyncio, uvloop", r"/asyncio/|uvloop"),
    ("uvicorn, httptools, starlette, FastAPI", r"uvicorn|httptools|starlette|fastapi|peer_"),
    ("quart, werkzeug", r"/quart|werkzeug"),
    ("atrium's layers and handlers", r"/atrium/|hello_asgi"),
    ("JWT, JSON, pydantic", r"/jwt/|orjson|pydantic|/json/"),
    ("logging, prometheus", r"/logging/|prometheus"),
    ("contextlib, abc, typing, enum, functools", r"contextlib|/abc\.py|typing|enum|functools"),
)


def py_spy() -> str:
    found = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy, or PY_SPY=path)")
    return found


def profile(args: argparse.Namespace, scenarios: list[Scenario], work: Path) -> None:
    """Sample each of PROFILED under its load with py-spy; print the buckets' shares."""
    spy = py_spy()
    shares: dict[str, Counter[str]] = {}
    for scenario in scenarios:
        if scenario.name not in PROFILED:
            continue
        out = work / f"profile-{len(shares)}.txt"
        seconds = int(args.warmup + args.duration + 1)
        argv = [
            spy,
            "record",
            "--pid",
            str(scenario.pid),
            "--rate",
            "250",
            "--duration",
            str(seconds),
        ]
        argv += ["--format", "raw", "--full-filenames", "--nonblocking", "--output", str(out)]
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as spying:
            run_load(scenario.port, scenario.request, args, scenario.probes)
            spying.wait()
        shares[scenario.name] = buckets(out.read_text())
    names = [name for name in PROFILED if name in shares]
    print("\nwhere the time goes (py-spy, share of samples by innermost frame):")
    print(f"{'bucket':<48}" + "".join(f"{n.replace(ME, '/me'):>23}" for n in names))
    for bucket in [label for label, _ in BUCKETS] + ["other"]:
        row = [shares[n][bucket] / max(1, sum(shares[n].values())) for n in names]
        print(f"{bucket:<48}" + "".join(f"{share:>23.1%}" for share in row))
    print(f"{'samples':<48}" + "".join(f"{sum(shares[n].values()):>23}" for n in names))


def buckets(raw: str) -> Counter[str]:
    """py-spy's raw (collapsed) stacks, counted by the bucket of each innermost frame
    (py-spy leaves out the samples of a thread waiting: idle)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        inner = stack.rsplit(";", 1)[-1]
        bucket = next((label for label, rx in BUCKETS if re.search(rx, inner)), "other")
        counts[bucket] += int(count)
    return counts


def report(scenarios: list[Scenario]) -> bool:
    """Print the table; True when both targets are met by atrium on its default parser
    (httptools; printed for h11 too)."""
    by_name = {s.name: s for s in scenarios}
    floor = by_name["hello, uvicorn"].cost
    print()
    print(f"{'scenario':<34}{'server us/req':>14}{'x uvicorn hello':>17}{'x peer':>8}  rounds")
    print("-" * 100)
    for s in scenarios:
        rounds = ", ".join(f"{c:.0f}" for c in s.costs)
        path = s.name.partition(" ")[2]
        peer = by_name.get(f"peer {path}") if s.name.startswith("atrium") else None
        versus = f"{s.cost / peer.cost:>7.2f}x" if peer else f"{'':>8}"
        print(f"{s.name:<34}{s.cost:>14.0f}{s.cost / floor:>16.1f}x{versus}  {rounds}")
    met = True
    for server in ("atrium", HTTPTOOLS):  # the targets hold for the default (httptools)
        health = by_name[f"{server} /health"].cost / floor
        me = by_name[f"{server} {ME}"].cost / by_name[f"peer {ME}"].cost
        health_ok, me_ok = health <= HEALTH_OVER_HELLO, me <= ME_OVER_PEER
        print()
        print(
            f"{server} /health: {health:.1f}x the hello app on uvicorn (target at most"
            f" {HEALTH_OVER_HELLO:g}x): {'yes' if health_ok else 'NO'}"
        )
        print(
            f"{server} {ME}, caches off: {me:.2f}x the FastAPI peer (target at most"
            f" {ME_OVER_PEER:g}x): {'yes' if me_ok else 'NO'}"
        )
        met = health_ok and me_ok
    return met


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_run_header(args, f"{args.rounds} rounds, medians; ")
    server_cpu = client_cpu = None
    if args.pin:
        server_cpu, client_cpu = (int(cpu) for cpu in args.pin.split(","))
        os.sched_setaffinity(0, {client_cpu})
    secret = secrets.token_urlsafe(48)
    scenarios: list[Scenario] = []
    pids: list[int] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atrium-floor-")))
        for label, hello_argv in HELLO.items():
            port, pid = stack.enter_context(open_hello(label, hello_argv, work))
            pids.append(pid)
            request = build_request("GET", "/", host=f"{HOST}:{port}")
            scenarios.append(Scenario(label, port, request, {"server": process_cpu(pid)}, pid))
        data_dir = work / "atrium"
        atrium = stack.enter_context(
            open_atrium(
                "atrium, caches off",
                data_dir,
                work / "atrium.log",
                timeout=START_TIMEOUT,
                SECRET_KEY=secret,
                SESSION_CACHE_SECONDS="0",
                PROJECT_CACHE_TTL_SECONDS="0",
                HTTP_PARSER="h11",
                METRICS_PORT="0",  # any free port: another atrium may hold the default
            )
        )
        token = trio.run(set_up, atrium.port, args.projects)
        probes = {"server": process_cpu(atrium.process.pid)}
        health = build_request("GET", "/health", host=f"{HOST}:{atrium.port}")
        scenarios.append(
            Scenario("atrium /health", atrium.port, health, probes, atrium.process.pid)
        )
        peer = stack.enter_context(open_peer(embedded_url(data_dir), secret, work))
        same_answers(atrium.port, peer, token, work / "peer.log")
        peer_probes = {"server": process_cpu(peer.process.pid)}
        fast = stack.enter_context(
            open_atrium(
                f"{HTTPTOOLS}, caches off",
                work / "atrium-httptools",
                work / "atrium-httptools.log",
                timeout=START_TIMEOUT,
                database_url=embedded_url(data_dir),
                SECRET_KEY=secret,
                SESSION_CACHE_SECONDS="0",
                PROJECT_CACHE_TTL_SECONDS="0",
                HTTP_PARSER="httptools",
                METRICS_PORT="0",
            )
        )
        fast_probes = {"server": process_cpu(fast.process.pid)}
        health = build_request("GET", "/health", host=f"{HOST}:{fast.port}")
        scenarios.append(
            Scenario(f"{HTTPTOOLS} /health", fast.port, health, fast_probes, fast.process.pid)
        )
        for path in (ME, PROJECTS):
            request = authorized(atrium.port, path, token)
            scenarios.append(
                Scenario(f"atrium {path}", atrium.port, request, probes, atrium.process.pid)
            )
            request = authorized(fast.port, path, token)
            scenarios.append(
                Scenario(f"{HTTPTOOLS} {path}", fast.port, request, fast_probes, fast.process.pid)
            )
            request = authorized(peer.port, path, token)
            scenarios.append(
                Scenario(f"peer {path}", peer.port, request, peer_probes, peer.process.pid)
            )
        if server_cpu is not None:
            for pid in (*pids, atrium.process.pid, fast.process.pid, peer.process.pid):
                pin(pid, server_cpu)
        measure(args, scenarios)
        if args.profile:
            profile(args, scenarios, work)
    print_load_average("after")
    met = report(scenarios)
    print("\nall targets met" if met else "\nsome targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    run_script(main)
