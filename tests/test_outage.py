"""Database outages are weather: refuse with 503 / 1013, lose nothing acknowledged, recover
without an operator; and the embedded PostgreSQL never outlives its atrium.

Each test runs its own embedded PostgreSQL (a fresh data directory), in-process through
``serve(settings, None)`` or under ``python run.py``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import conftest
import httpx
import pytest
import trio
from conftest import CLIENT_TLS, FakeClock
from served import start_serving
from test_workspace import edit
from trio_websocket import HandshakeError
from wsclient import Client, connect

from atrium.persistence.embedded import EmbeddedPostgres, _is_postmaster_of, embedded_postgres
from atrium.runtime.root import Bound, serve
from atrium.supervision import Supervisor


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory outside pytest's tmp_path: as root, PostgreSQL runs as another user
    who must reach it, and pytest keeps its own base directory private (0700)."""
    with tempfile.TemporaryDirectory(prefix="atrium-outage-") as tmp:
        yield Path(tmp) / "data"


async def owner_and_project(http: httpx.AsyncClient) -> tuple[dict[str, str], str]:
    body = {"email": "owner@example.com", "password": "correct horse"}
    assert (await http.post("/api/v1/auth/signup", json=body)).status_code == 201
    r = await http.post("/api/v1/auth/login", json=body)
    auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = await http.post("/api/v1/projects/", json={"name": "Weather"}, headers=auth)
    assert r.status_code == 201, r.text
    return auth, str(r.json()["id"])


async def ack_or_close(client: Client, client_id: str) -> tuple[str, int]:
    """("ack", seq) when the edit was stored, ("closed", code) when the server closed."""
    try:
        while True:
            message = await client.recv()
            if message["type"] == "ACK" and message["id"] == client_id:
                return "ack", int(message["seq"])
    except Exception:  # the close arrives as ConnectionClosed from the client library
        assert client.ws.closed is not None
        await client.release()
        return "closed", client.ws.closed.code


async def join_outcome(url: str, token: str) -> int | str:
    """ "joined" when the server greets the connection, else its close code."""
    try:
        async with connect(url, token) as client:
            try:
                first = await client.recv()
            except Exception:
                assert client.ws.closed is not None
                await client.release()
                return client.ws.closed.code
            assert first["type"] == "PRESENCE_STATE"
            return "joined"
    except HandshakeError:  # pragma: no cover - a refused handshake is a failure below
        return "handshake_refused"


async def edits_in_log(url: str, token: str) -> dict[str, int]:
    """client id -> seq of every FILE_CHANGE, read by resuming from seq 0."""
    stored: dict[str, int] = {}
    async with connect(url + "?since_seq=0", token) as client:
        while (message := await client.recv())["type"] != "RESUMED":
            if message["type"] == "FILE_CHANGE":
                stored[message["file_path"]] = int(message["seq"])
        assert message["recovered"] is True
    return stored


async def store_edits(client: Client, prefix: str, count: int) -> dict[str, int]:
    acked: dict[str, int] = {}
    for n in range(count):
        await client.send(edit(f"/{prefix}-{n}", f"{prefix}-{n}"))
        kind, seq = await ack_or_close(client, f"{prefix}-{n}")
        assert kind == "ack"
        acked[f"/{prefix}-{n}"] = seq
    return acked


# -- in process: a deterministic outage (the postmaster taken away, then given back) -------


@dataclass
class Embedded:
    bound: Bound
    http: httpx.AsyncClient

    @property
    def postgres(self) -> Supervisor:
        assert self.bound.supervisor is not None
        sup: Supervisor = self.bound.supervisor.child("postgres").value
        return sup

    def ws_urls(self, project_id: str) -> list[str]:
        host = self.bound.host
        return [
            f"ws://{host}:{self.bound.port}/ws/{project_id}",
            f"ws://{host}:{self.bound.ws_port}/ws/{project_id}",
        ]


@asynccontextmanager
async def embedded_server(
    data_dir: Path, nursery: trio.Nursery, clock: FakeClock, **env: Any
) -> AsyncIterator[Embedded]:
    """The real server, in process, with its own embedded PostgreSQL (no DATABASE_URL)."""
    settings = conftest.test_settings(data_dir, **env)
    bound: Bound = await nursery.start(
        lambda task_status: serve(settings, None, task_status=task_status, clock=clock)
    )
    async with httpx.AsyncClient(base_url=bound.url, verify=CLIENT_TLS) as http:
        yield Embedded(bound, http)


async def test_an_outage_is_refused_with_503_and_1013_and_passes(
    aio_loop: None, data_dir: Path, nursery: trio.Nursery
) -> None:
    clock = FakeClock()  # drives cache expiry
    async with embedded_server(
        data_dir, nursery, clock, PROJECT_CACHE_TTL_SECONDS=60, SESSION_CACHE_SECONDS=60
    ) as server:
        http = server.http
        auth, project_id = await owner_and_project(http)
        token = auth["Authorization"][7:]
        projects = await http.get("/api/v1/projects/", headers=auth)
        assert projects.status_code == 200 and projects.json()["cached"] is False
        main_url, listener_url = server.ws_urls(project_id)
        async with connect(main_url, token) as a, connect(listener_url, token) as b:
            assert (await a.recv())["type"] == "PRESENCE_STATE"
            assert (await b.recv())["type"] == "PRESENCE_STATE"
            acked = await store_edits(a, "a", 3) | await store_edits(b, "b", 3)

            postmaster = server.postgres.child("postmaster").spec
            await server.postgres.terminate_child("postmaster")  # PostgreSQL stops: an outage

            # A live workspace that cannot store an edit closes its connections with 1013
            # and acknowledges nothing.
            await a.send(edit("/during", "during"))
            assert await ack_or_close(a, "during") == ("closed", 1013)
            assert await ack_or_close(b, "never") == ("closed", 1013)

        # New joins are refused with 1013 on both transports.
        for url in (main_url, listener_url):
            assert await join_outcome(url, token) == 1013
        # REST: within its TTL the cache may answer; past it, 503 with Retry-After.
        r = await http.get("/api/v1/projects/", headers=auth)
        assert r.status_code == 200 and r.json()["cached"] is True
        clock.advance(61)
        r = await http.get("/api/v1/projects/", headers=auth)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
        assert 1 <= int(r.headers["Retry-After"]) <= 5
        r = await http.post("/api/v1/projects/", json={"name": "No"}, headers=auth)
        assert r.status_code == 503 and "Retry-After" in r.headers
        r = await http.get("/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False
        assert body["checks"]["database"]["ok"] is False
        assert "unavailable" in body["checks"]["database"]["error"]

        await server.postgres.start_child(postmaster)  # PostgreSQL is back
        r = await http.get("/ready")
        assert r.status_code == 200, r.text
        r = await http.get("/api/v1/projects/", headers=auth)
        assert r.status_code == 200 and [p["id"] for p in r.json()["projects"]] == [project_id]
        # Nothing acknowledged was lost, and the refused edit was not stored: resent with
        # its id it is stored once.
        stored = await edits_in_log(main_url, token)
        assert {k: v for k, v in stored.items() if k in acked} == acked
        assert "/during" not in stored
        async with connect(listener_url, token) as again:
            await again.recv()
            await again.send(edit("/during", "during"))
            kind, seq = await ack_or_close(again, "during")
            await again.send(edit("/during", "during"))
            assert await ack_or_close(again, "during") == (kind, seq) == ("ack", seq)
        nursery.cancel_scope.cancel()


# -- python run.py: the postmaster killed under a live server ------------------------------


@dataclass
class Process:
    process: trio.Process
    url: str
    ws_port: int
    pgdata: Path

    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])


@asynccontextmanager
async def run_py(data_dir: Path, log: Path) -> AsyncIterator[Process]:
    """``python run.py`` with its own embedded PostgreSQL; SIGTERMed at the end unless the
    test killed it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ENVIRONMENT", "SECRET_KEY", "DATABASE_URL")
    }
    env.update(
        DATA_DIR=str(data_dir),
        PORT="0",
        WS_PORT="0",
        METRICS_PORT="0",
        RATE_LIMIT_PER_MINUTE="10000",
        AUTH_RATE_LIMIT_PER_MINUTE="10000",
    )
    with open(log, "ab") as errors:  # noqa: ASYNC230 - a local file, opened once
        async with trio.open_nursery() as nursery:
            served = await start_serving(nursery, env, stderr=errors)
            process = served.process
            yield Process(process, served.url, served.ws_port, (data_dir / "pg").resolve())
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(60):
                    while await process.stdout.receive_some():
                        pass
                    assert await process.wait() == 0


@pytest.mark.long
async def test_the_embedded_postmaster_killed_under_load_comes_back_by_itself(
    data_dir: Path, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with run_py(data_dir, tmp_path / "server.log") as server:
            host = server.url.split("//")[1].split(":")[0]
            async with httpx.AsyncClient(base_url=server.url, verify=CLIENT_TLS) as http:
                auth, project_id = await owner_and_project(http)
                token = auth["Authorization"][7:]
                main_url = f"ws://{host}:{server.url.rsplit(':', 1)[1]}/ws/{project_id}"
                listener_url = f"ws://{host}:{server.ws_port}/ws/{project_id}"
                acked: dict[str, int] = {}
                async with connect(main_url, token) as a, connect(listener_url, token) as b:
                    await a.recv(), await b.recv()
                    acked |= await store_edits(a, "a", 5) | await store_edits(b, "b", 5)

                    killed_at = time.monotonic()
                    os.kill(server.postmaster_pid(), signal.SIGKILL)
                    # Under load: an edit right after the kill is either stored (ACK) or
                    # refused with 1013, never acknowledged and lost.
                    await a.send(edit("/a-kill", "a-kill"))
                    kind, value = await ack_or_close(a, "a-kill")
                    assert (kind, value) == ("closed", 1013) or kind == "ack"
                    if kind == "ack":
                        acked["/a-kill"] = value
                    else:  # the whole workspace closed: b too
                        assert await b.closed() == (1013, "database_unavailable")

                # While it is away: REST 503 (never 500), joins 1013, /ready names the database.
                ready_503 = joins_1013 = rest_503 = 0
                while True:
                    r = await http.get("/ready")
                    if r.status_code == 200:
                        if ready_503:
                            break
                    else:
                        assert r.status_code == 503
                        checks = r.json()["checks"]
                        assert not checks["database"]["ok"] or checks["supervision"]["down"] == [
                            "postgres/postmaster"
                        ]
                        ready_503 += 1
                    r = await http.post("/api/v1/projects/", json={"name": "Rain"}, headers=auth)
                    assert r.status_code in (201, 503), r.text
                    if r.status_code == 503:
                        assert r.json()["error"]["code"] == "database_unavailable"
                        assert int(r.headers["Retry-After"]) > 0
                        rest_503 += 1
                    for url in (main_url, listener_url):
                        outcome = await join_outcome(url, token)
                        assert outcome in ("joined", 1013)
                        joins_1013 += outcome == 1013
                    await trio.sleep(0.02)
                recovery = time.monotonic() - killed_at
                print(f"recovered {recovery:.2f} s after the kill")
                assert ready_503 and rest_503 and joins_1013
                assert server.process.returncode is None  # the process never exited

                # Back: REST works, and resuming shows every acknowledged edit.
                r = await http.get("/api/v1/projects/", headers=auth)
                assert r.status_code == 200
                for url in (main_url, listener_url):
                    stored = await edits_in_log(url, token)
                    assert {k: v for k, v in stored.items() if k in acked} == acked
            pgdata, postmaster = server.pgdata, server.postmaster_pid()
        assert not _is_postmaster_of(postmaster, pgdata)  # a clean stop stops it


@pytest.mark.long
async def test_a_sigkilled_server_leaves_no_postgres_running(
    data_dir: Path, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with run_py(data_dir, tmp_path / "server.log") as server:
            postmaster = server.postmaster_pid()
            server.process.kill()
            await server.process.wait()
            # The guard sees its pipe close and stops PostgreSQL at once.
            while _is_postmaster_of(postmaster, server.pgdata):  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        # The next start on the same data directory serves, and stops cleanly.
        async with run_py(data_dir, tmp_path / "server.log") as server:
            async with httpx.AsyncClient(base_url=server.url, verify=CLIENT_TLS) as http:
                assert (await http.get("/ready")).status_code == 200
            postmaster = server.postmaster_pid()
        assert not _is_postmaster_of(postmaster, server.pgdata)


# -- the embedded PostgreSQL on its own ------------------------------------------------------


def test_an_orphaned_postmaster_is_stopped_before_the_next_start(data_dir: Path) -> None:
    # A postmaster with no atrium behind it: what pgserver's pg_ctl left after a kill -9.
    cluster = EmbeddedPostgres(data_dir)
    cluster.prepare()
    orphan = subprocess.Popen(
        cluster.guard_command()[4:],  # postgres itself, without the guard
        user=cluster.system_user,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (cluster.postmaster_pid() == orphan.pid and cluster.ready_under(os.getpid())):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with embedded_postgres(data_dir) as url:
            assert orphan.wait(10) == 0  # stopped by a fast shutdown, not killed
            assert cluster.postmaster_pid() != orphan.pid
            assert _select_one(url) == 1
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def _select_one(url: str) -> int:
    async def query() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    import asyncio

    return asyncio.run(query())


def test_a_long_data_path_gets_a_private_socket_directory_never_a_planted_one() -> None:
    with tempfile.TemporaryDirectory(prefix="atrium-outage-") as tmp:
        data_dir = Path(tmp) / ("deep-" * 20) / "data"
        pgdata = (data_dir / "pg").resolve()
        assert len(str(pgdata)) > 80
        # What a local attacker plants at the path atrium used to trust.
        digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
        planted = Path(tempfile.gettempdir()) / f"atrium-pg-{digest}"
        victim = Path(tmp) / "victim"
        victim.mkdir()
        planted.symlink_to(victim, target_is_directory=True)
        try:
            with embedded_postgres(data_dir) as url:
                socket_dir = Path(url.split("host=")[1])
                assert socket_dir != planted and socket_dir.resolve() != victim
                assert socket_dir.stat().st_mode & 0o777 == 0o700
                assert (socket_dir / ".s.PGSQL.5432").is_socket()
                assert _select_one(url) == 1
            assert list(victim.iterdir()) == []  # neither data nor socket went there
            assert (pgdata / "PG_VERSION").exists()
            assert not socket_dir.exists()  # removed with the server
        finally:
            planted.unlink()
