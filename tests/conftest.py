"""Shared fixtures: a real PostgreSQL (embedded unless DATABASE_URL is set), a fresh
migrated database per test, and the real server on port 0 with an HTTP client."""

from __future__ import annotations

import asyncio
import fcntl
import io
import itertools
import logging
import os
import re
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import trio
from argon2 import PasswordHasher
from redis_server import RedisServer

from atrium.actors.workspace import Status, WorkspaceActor
from atrium.core.config import Settings, load_settings
from atrium.core.logs import make_handler
from atrium.identity import passwords
from atrium.persistence.database import Database, open_database
from atrium.persistence.embedded import embedded_postgres
from atrium.persistence.migrate import migrate
from atrium.runtime.root import Bound, serve
from atrium.seams.aio_loop import open_loop

# The TLS context of every test client: httpx builds one per client otherwise, loading the
# system's CA bundle each time (a tenth of a second of CPU or more), for servers that speak
# plain HTTP on 127.0.0.1.
CLIENT_TLS = ssl.create_default_context()

_TEMPLATE = f"atrium_tpl_{os.getpid()}"
_counter = itertools.count()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for the whole session (never mocked)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with (
        tempfile.TemporaryDirectory(prefix="atrium-test-") as tmp,
        embedded_postgres(Path(tmp)) as embedded_url,
    ):
        # A scratch cluster that dies with the session: no fsync (a commit costs a tenth
        # of a millisecond, not one or two; a database's drop 10 ms, not 50). Committed
        # data still reaches the kernel before the commit returns, so a killed postmaster
        # loses nothing; only a machine crash would. Tests of the embedded PostgreSQL's own
        # crashes (tests/test_outage.py, bench/chaos.py) run clusters of their own.
        asyncio.run(
            _admin(
                embedded_url,
                "ALTER SYSTEM SET fsync = off",
                "ALTER SYSTEM SET full_page_writes = off",
                "SELECT pg_reload_conf()",
            )
        )
        yield embedded_url


@pytest.fixture(scope="session")
def template_url(pg_server: str) -> Iterator[str]:
    """A database migrated once, cloned by every test."""
    asyncio.run(
        _admin(pg_server, f"DROP DATABASE IF EXISTS {_TEMPLATE}", f"CREATE DATABASE {_TEMPLATE}")
    )
    url = _with_database(pg_server, _TEMPLATE)

    async def run_migrations() -> None:
        async with open_loop(), open_database(url, pool_size=1) as db:
            await migrate(db)

    trio.run(run_migrations)
    created: list[str] = []
    yield url
    asyncio.run(
        _admin(
            pg_server,
            *(f"DROP DATABASE IF EXISTS {n}" for n in created),
            f"DROP DATABASE IF EXISTS {_TEMPLATE}",
        )
    )


@contextmanager
def _fresh_database(pg_server: str) -> Iterator[str]:
    """A database cloned from the migrated template, dropped at the end of the block."""
    name = f"{_TEMPLATE}_{next(_counter)}"
    asyncio.run(_admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}"))
    try:
        yield _with_database(pg_server, name)
    finally:
        asyncio.run(_admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def database_url(pg_server: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    with _fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="module")
def module_database_url(pg_server: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database shared by the tests of one module: for a server that
    the module starts once (a ``run.py`` subprocess costs seconds), whose tests then keep
    to rows of their own (fresh users and projects)."""
    with _fresh_database(pg_server) as url:
        yield url


# What must never reach a log line, whichever test wrote it: the suite's password, its
# signing key, and (should the redaction fail) anything shaped like a JWT.
_NEVER_LOGGED = re.compile(
    r"correct horse|test-secret-key-with-enough-length|eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+"
)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Every record the suite logs (at the levels the loggers pass, warnings and
    tracebacks included) goes through the handler run.py installs; at the end, none may
    hold a secret."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    leaked = [line for line in stream.getvalue().splitlines() if _NEVER_LOGGED.search(line)]
    assert not leaked, f"{len(leaked)} log line(s) hold a secret, the first: {leaked[0][:300]}"


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashing() -> Iterator[None]:
    """argon2id at its cheapest parameters for every server this process starts: a
    signup or login costs about a millisecond instead of a quarter of a second, and a
    suite that signs up thousands of users spends that time on what it tests.
    tests/test_passwords.py checks the hashing bound; ``run.py`` subprocesses keep the
    production parameters."""
    cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "_hasher", cheap)
        patch.setattr(passwords, "_DUMMY_HASH", cheap.hash("atrium-timing-equaliser"))
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The URL of a Redis server for the whole session (REDIS_URL, else one started here)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop and start (never the session's)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def _own_redis_databases() -> list[int]:
    """The logical databases 1-15 this process may use: under pytest-xdist, worker N of M
    takes every Mth one from N+1, so workers sharing a REDIS_URL never see each other's
    keys (db 0 is left alone)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count > 15:
        raise RuntimeError("more than 15 xdist workers cannot each have Redis databases")
    return list(range(1 + int(worker), 16, count))


_redis_databases = itertools.cycle(_own_redis_databases())


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A Redis logical database of the session's server, emptied for this test (pub/sub
    channels are server-wide: name them by something unique, such as a project id)."""
    import redis

    url = _with_database(redis_server, str(next(_redis_databases)))
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop that run.py opens at its root."""
    async with open_loop():
        yield


@pytest.fixture
async def db(aio_loop: None, database_url: str) -> AsyncIterator[Database]:
    async with open_database(database_url, pool_size=4) as database:
        yield database


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_settings(data_dir: Path, **env: Any) -> Settings:
    """Settings as a test server uses them: port 0, generous limits unless overridden."""
    base = {
        "ENVIRONMENT": "test",
        "PORT": "0",
        "WS_PORT": "0",
        "DATA_DIR": str(data_dir),
        "SECRET_KEY": "test-secret-key-with-enough-length-0123456789",
        "RATE_LIMIT_PER_MINUTE": "10000",
        "AUTH_RATE_LIMIT_PER_MINUTE": "10000",
        "WS_USER_EDITS_PER_SECOND": "10000",
        "DB_POOL_SIZE": "6",
        "METRICS_PORT": "0",
    }
    if "HTTP_PARSER" in os.environ:  # HTTP_PARSER=h11 runs the suite on hypercorn's h11
        base["HTTP_PARSER"] = os.environ["HTTP_PARSER"]
    base.update({k: str(v) for k, v in env.items()})
    return load_settings(base)


class FakeClock:
    """A wall clock that tests move by hand (drives rate-limit windows)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Running:
    """A live server and a client pointed at it."""

    bound: Bound
    client: httpx.AsyncClient
    settings: Settings

    async def signup_login(self, email: str, password: str = "correct horse") -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/auth/signup", json={"email": email, "password": password}
        )
        assert r.status_code == 201, r.text
        r = await self.client.post(
            "/api/v1/auth/login", json={"email": email, "password": password}
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def workspace_actor(self, project_id: str) -> WorkspaceActor:
        """The project's live actor (a test-only hook into the running tree)."""
        assert self.bound.services is not None
        return await self.bound.services.value.workspaces.get(uuid.UUID(project_id))


class InjectedFault(RuntimeError):
    """The bug a crash-recovery test plants in an actor."""


class _CrashingWorkspaceActor(WorkspaceActor):
    """A workspace actor whose next message raises InjectedFault, as a bug in ``handle``
    would. ``crash_workspace`` turns one running actor into this class for one message:
    production actors carry no fault hook."""

    __slots__ = ()

    async def handle(self, message: Any) -> Any:
        self.__class__ = WorkspaceActor
        raise InjectedFault(f"crash requested for {self.name}")


async def crash_workspace(actor: WorkspaceActor) -> None:
    """Make a workspace actor crash as a bug would: on the next message, here a Status."""
    actor.__class__ = _CrashingWorkspaceActor
    await actor.tell(Status())


StartServer = Callable[..., Any]


@pytest.fixture
async def start_server(
    aio_loop: None, database_url: str, data_dir: Path, nursery: trio.Nursery
) -> AsyncIterator[StartServer]:
    """Start the real server (as run.py does) on port 0; returns a ``Running``."""

    @asynccontextmanager
    async def start(clock: Callable[[], float] | None = None, **env: Any) -> AsyncIterator[Running]:
        settings = test_settings(data_dir, **env)
        kwargs: dict[str, Any] = {"clock": clock} if clock else {}
        bound: Bound = await nursery.start(
            lambda task_status: serve(settings, database_url, task_status=task_status, **kwargs)
        )
        async with httpx.AsyncClient(base_url=bound.url, verify=CLIENT_TLS) as client:
            yield Running(bound, client, settings)

    yield start


@pytest.fixture
async def server(start_server: StartServer) -> AsyncIterator[Running]:
    """The real server with test settings."""
    async with start_server() as running:
        yield running


# -- the suite on every core (pytest -n auto) --------------------------------------------
# Each pytest-xdist worker is a process of its own with its own PostgreSQL and Redis (the
# session fixtures above), so workers share nothing but the machine; these hooks share it.


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core this process may run on, at most 8 (each starts a
    PostgreSQL and a Redis, and shares a REDIS_URL by its logical databases)."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``long`` first, so that one started last cannot keep a worker busy
    after the others have finished (xdist hands tests out in this order)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@contextmanager
def _share_machine(directory: Path, *, alone: bool) -> Iterator[None]:
    """A readers-writer lock over ``directory`` between processes: shared by default,
    exclusive when ``alone``. A test that wants the machine to itself takes the turnstile
    first and holds it while it waits, so no other test starts meanwhile."""
    with (
        open(directory / "machine.turnstile", "a") as turnstile,
        open(directory / "machine.lock", "a") as lock,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def machine_share(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``alone`` (one that measures latency, which a
    neighbour on the same cores would skew) runs while no other worker runs a test."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    # The parent of a worker's base directory is the one every worker of this run shares.
    shared = tmp_path_factory.getbasetemp().parent
    with _share_machine(shared, alone=request.node.get_closest_marker("alone") is not None):
        yield
