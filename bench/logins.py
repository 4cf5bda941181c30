"""Login-burst benchmark: memory and latency while many logins hash passwords at once.

    python bench/logins.py [--logins 100] [--scenario bounded|unbounded|both]

Starts ``python run.py`` (embedded PostgreSQL in a temporary data directory, rate limits
lifted, TRUSTED_PROXIES=127.0.0.1), signs up ``--logins`` users, then fires one login per
user at once, each from its own address (``X-Forwarded-For: 198.18.x.y``, as a load
balancer would send it), while one client keeps calling ``GET /api/v1/auth/me``:

- bounded: PASSWORD_HASH_CONCURRENCY at its default (the core count) and
  PASSWORD_HASH_QUEUE_SECONDS=2; a login refused with 503 ``server_busy`` retries after
  its ``Retry-After``, as a client should;
- unbounded: PASSWORD_HASH_CONCURRENCY=1000 and a long queue: every login hashes in a
  thread of its own at once, as before the bound (which ran them in trio's default thread
  pool, up to 40 at a time).

Prints, per scenario: the server's resident memory before the burst and its peak during
it (VmHWM from /proc/<pid>/status, reset before the burst through clear_refs), the login
outcomes and latencies (first attempt, and until every user is logged in), and ``/me``
latency before and during the burst.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path; the repository root is needed.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import orjson  # noqa: E402
import trio  # noqa: E402

from bench._load import (  # noqa: E402
    HOST,
    PASSWORD,
    api_request,
    bench_email,
    build_request,
    fetch,
    nearest_rank_ms,
    open_atrium,
    print_load_average,
    run_script,
)

START_TIMEOUT = 60.0
SCENARIOS = {
    "bounded": {"PASSWORD_HASH_QUEUE_SECONDS": "2"},
    "unbounded": {"PASSWORD_HASH_CONCURRENCY": "1000", "PASSWORD_HASH_QUEUE_SECONDS": "600"},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/logins.py", description="atrium login burst: peak RSS and latencies."
    )
    parser.add_argument("--logins", type=int, default=100, help="concurrent logins (100)")
    parser.add_argument(
        "--scenario", choices=[*SCENARIOS, "both"], default="both", help="default: both"
    )
    return parser.parse_args(argv)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of ``pid`` to its current RSS; False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass(slots=True)
class Burst:
    first: Counter[int] = field(default_factory=Counter)
    first_latency: list[float] = field(default_factory=list)  # first attempts that got 200
    until_in: list[float] = field(default_factory=list)  # start to 200, retries included
    attempts: int = 0
    me: list[float] = field(default_factory=list)
    me_errors: int = 0


async def sign_up_all(port: int, emails: list[str]) -> None:
    """Sign every user up, two at a time (signup hashes too), retrying a busy refusal."""
    limiter = trio.CapacityLimiter(2)

    async def one(email: str) -> None:
        async with limiter:
            while True:
                request = api_request(
                    "POST", "/api/v1/auth/signup", port, {"email": email, "password": PASSWORD}
                )
                status, body = await fetch(HOST, port, request)
                if status == 201:
                    return
                if status != 503:
                    raise RuntimeError(f"signup answered {status}: {body[:200]!r}")

    async with trio.open_nursery() as nursery:
        for email in emails:
            nursery.start_soon(one, email)


def login_request(port: int, email: str, address: str) -> bytes:
    body = orjson.dumps({"email": email, "password": PASSWORD})
    headers = {"Content-Type": "application/json", "X-Forwarded-For": address}
    return build_request(
        "POST", "/api/v1/auth/login", host=f"{HOST}:{port}", headers=headers, body=body
    )


async def probe_me(port: int, token: str, stop: trio.Event, burst: Burst) -> None:
    """GET /me on fresh connections, one after the other, until ``stop``."""
    request = api_request("GET", "/api/v1/auth/me", port, token=token)
    while not stop.is_set():
        started = time.perf_counter()
        status, _ = await fetch(HOST, port, request)
        burst.me.append(time.perf_counter() - started)
        burst.me_errors += status != 200
        await trio.sleep(0.01)


async def run_burst(port: int, emails: list[str], token: str) -> tuple[Burst, Burst]:
    """``/me`` alone for a second (baseline), then every login at once with ``/me`` running."""
    baseline = Burst()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_me, port, token, stop, baseline)
        await trio.sleep(1.0)
        stop.set()

    burst = Burst()
    go = trio.Event()

    async def login(n: int, email: str) -> None:
        request = login_request(port, email, f"198.18.{n // 250}.{n % 250 + 1}")
        await go.wait()
        started = time.perf_counter()
        first = True
        while True:
            sent = time.perf_counter()
            status, body = await fetch(HOST, port, request)
            burst.attempts += 1
            if first:
                burst.first[status] += 1
                if status == 200:
                    burst.first_latency.append(time.perf_counter() - sent)
                first = False
            if status == 200:
                burst.until_in.append(time.perf_counter() - started)
                return
            if status != 503:
                raise RuntimeError(f"login answered {status}: {body[:200]!r}")
            # fetch() keeps no headers; the message repeats Retry-After ("retry in N s").
            retry_after = re.search(rb"retry in (\d+) s", body)
            await trio.sleep(int(retry_after[1]) if retry_after else 1)

    stop = trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(probe_me, port, token, stop, burst)
        async with trio.open_nursery() as nursery:
            for n, email in enumerate(emails):
                nursery.start_soon(login, n, email)
            await trio.sleep(0.05)
            go.set()
        stop.set()
    return baseline, burst


def ms(values: list[float], q: float) -> str:
    return f"{nearest_rank_ms(sorted(values), q):,.0f}"


def run_scenario(name: str, args: argparse.Namespace, work: Path) -> None:
    settings = {"TRUSTED_PROXIES": "127.0.0.1", **SCENARIOS[name]}
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    with open_atrium(
        name,
        work / name,
        work / f"{name}.log",
        timeout=START_TIMEOUT,
        note=f" ({shown})",
        **settings,
    ) as atrium:
        emails = [bench_email() for _ in range(args.logins)]
        trio.run(sign_up_all, atrium.port, emails)
        request = api_request(
            "POST", "/api/v1/auth/login", atrium.port, {"email": emails[0], "password": PASSWORD}
        )
        token = str(orjson.loads(trio.run(fetch, HOST, atrium.port, request)[1])["access_token"])
        pid = atrium.process.pid
        before = memory_kib(pid)
        peak_is_burst = reset_peak(pid)
        started = time.perf_counter()
        baseline, burst = trio.run(run_burst, atrium.port, emails, token)
        wall = time.perf_counter() - started - 1.0
        after = memory_kib(pid)
    peak_note = "during the burst" if peak_is_burst else "since start (clear_refs refused)"
    print(f"  server RSS before: {before['VmRSS'] / 1024:,.0f} MiB")
    print(f"  server peak RSS {peak_note}: {after['VmHWM'] / 1024:,.0f} MiB")
    print(f"  server RSS after: {after['VmRSS'] / 1024:,.0f} MiB")
    print(
        f"  {args.logins} logins: first attempt {dict(sorted(burst.first.items()))};"
        f" {burst.attempts} attempts in all; everyone in after {wall:.1f} s"
    )
    if burst.first_latency:
        print(
            f"  first-attempt 200s: p50 {ms(burst.first_latency, 50)} ms"
            f"  p99 {ms(burst.first_latency, 99)} ms  max {ms(burst.first_latency, 100)} ms"
        )
    print(
        f"  until logged in (retries included): p50 {ms(burst.until_in, 50)} ms"
        f"  p99 {ms(burst.until_in, 99)} ms  max {ms(burst.until_in, 100)} ms"
    )
    for label, probe in (("before", baseline), ("during", burst)):
        print(
            f"  GET /me {label} the burst: {len(probe.me)} calls, p50 {ms(probe.me, 50)} ms"
            f"  p99 {ms(probe.me, 99)} ms  max {ms(probe.me, 100)} ms  errors {probe.me_errors}"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(
        f"{args.logins} concurrent logins, each from its own address;"
        f" {os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
        flush=True,
    )
    print_load_average("before")
    names = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        for name in names:
            run_scenario(name, args, Path(tmp))
    print_load_average("after")
    return 0


if __name__ == "__main__":
    run_script(main)
