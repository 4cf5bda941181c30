"""``run.py --workers N``: several serving processes on one port, supervised.

The group's supervisor runs in the test (``serve_processes``) or as ``run.py`` itself;
its workers are real ``run.py serve`` processes on a real PostgreSQL and a real Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import CLIENT_TLS
from conftest import test_settings as make_settings
from served import start_serving

from atrium.core.config import ConfigError, Settings, load_settings
from atrium.http.reuseport import reuse_port_socket
from atrium.persistence.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from atrium.runtime import process_group
from atrium.runtime.process_group import (
    ProcessGroup,
    WorkerExited,
    _LineReader,
    serve_processes,
    worker_env,
)
from atrium.supervision import Backoff, SupervisorEscalation

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = [sys.executable, str(ROOT / "run.py"), "serve", "--supervised"]
SECRET = "test-secret-key-with-enough-length-0123456789"


def worker_environ() -> dict[str, str]:
    """What the workers inherit: this environment, in development mode (no operator token
    for /health/supervisor), with the test's key."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(ENVIRONMENT="development", SECRET_KEY=SECRET, LOG_LEVEL="WARNING")
    return env


async def answering_pid(url: str) -> int:
    """The pid of the process that answers a request on a new connection."""
    async with httpx.AsyncClient(base_url=url, verify=CLIENT_TLS) as client:
        response = await client.get("/health/supervisor", headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    pid: int = response.json()["pid"]
    return pid


async def pids_answering(url: str, expected: set[int]) -> set[int]:
    """Send requests on new connections until every pid in ``expected`` has answered (the
    kernel spreads connections by a hash of their ports); return the pids seen."""
    seen: set[int] = set()
    with trio.fail_after(30):
        while not expected <= seen:
            seen.add(await answering_pid(url))
    return seen


class Lines:
    """What the group reports, line by line, to wait on."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[str](1000)
        self.seen: list[str] = []

    def report(self, line: str) -> None:
        self.send.send_nowait(line)

    async def wait_for(self, text: str) -> str:
        with trio.fail_after(60):
            async for line in self.receive:
                self.seen.append(line)
                if text in line:
                    return line
        raise AssertionError(f"no line with {text!r} in {self.seen}")


async def serve_until_it_fails(
    settings: Settings, command: list[str], report: Callable[[str], None], **options: Any
) -> None:
    """Run a group of ``command`` workers, never asked to stop, until it raises."""
    await serve_processes(
        settings,
        command,
        shutdown_trigger=trio.sleep_forever,
        report=report,
        environ=worker_environ(),
        **options,
    )


@pytest.mark.long
async def test_two_workers_share_a_port_and_a_killed_one_is_replaced(
    aio_loop: None, data_dir: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        data_dir, WORKERS="2", DATABASE_URL=database_url, REDIS_URL=redis_url, METRICS_PORT="0"
    )
    lines = Lines()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        group: ProcessGroup = await nursery.start(
            partial(
                serve_processes,
                settings,
                RUN_PY,
                shutdown_trigger=stop.wait,
                report=lines.report,
                environ=worker_environ(),
            )
        )
        workers = {w.name: w for w in group.workers()}
        assert sorted(workers) == ["worker-1", "worker-2"]
        assert all(w.metrics_port for w in workers.values())
        # One port, answered by both processes.
        first = {w.pid for w in workers.values()}
        assert await pids_answering(group.url, first) == first

        killed, survivor = workers["worker-1"].pid, workers["worker-2"].pid
        os.kill(killed, signal.SIGKILL)
        await lines.wait_for(f"worker-1 (pid {killed}) exited with status -9")
        # While it is restarted, every request is answered: by the survivor, or by worker-1's
        # replacement once that serves (on a busy machine it can be back within these 20).
        answered = [await answering_pid(group.url) for _ in range(20)]
        line = await lines.wait_for("worker-1 (pid ")
        replacement = next(w.pid for w in group.workers() if w.name == "worker-1")
        assert f"(pid {replacement}) serving" in line
        assert set(answered) <= {survivor, replacement}
        assert await pids_answering(group.url, {survivor, replacement}) == {survivor, replacement}
        restarts = group.supervisor.child("worker-1").restart_count
        assert restarts == 1
        await a_document_written_on_one_worker_is_read_live_on_the_other(group.url)

        stop.set()
    for pid in (survivor, replacement):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert any("[worker-2]: stopped" in line for line in lines.seen + drain(lines))


async def pinned(url: str, other_than: int | None = None) -> tuple[httpx.AsyncClient, int]:
    """A client whose requests all go to one worker (one kept-alive connection), not
    ``other_than``; and that worker's pid."""
    with trio.fail_after(30):
        while True:
            client = httpx.AsyncClient(base_url=url)
            r = await client.get("/health/supervisor")
            pid: int = r.json()["pid"]
            if pid != other_than:
                return client, pid
            await client.aclose()


async def a_document_written_on_one_worker_is_read_live_on_the_other(url: str) -> None:
    """Each worker serving a live document holds a replica; what one stores reaches the
    other's through the bridge."""
    one, pid = await pinned(url)
    two, _ = await pinned(url, other_than=pid)
    try:
        body = {"email": "docs@example.com", "password": "correct horse"}
        assert (await one.post("/api/v1/auth/signup", json=body)).status_code == 201
        auth = {
            "Authorization": "Bearer "
            + (await one.post("/api/v1/auth/login", json=body)).json()["access_token"]
        }
        r = await one.post("/api/v1/projects/", json={"name": "Docs"}, headers=auth)
        documents = f"/api/v1/projects/{r.json()['id']}/documents"
        r = await one.post(documents, json={"path": "/live.md", "text": "first"}, headers=auth)
        assert r.status_code == 201, r.text
        text = f"{documents}/{r.json()['room']}/text"
        assert (await two.get(text, headers=auth)).json()["text"] == "first"  # opened there
        r = await one.post(
            documents, json={"path": "/live.md", "text": "first, then"}, headers=auth
        )
        assert r.status_code == 200, r.text
        with trio.fail_after(10):
            # Another process: its answers are what can be observed of it.
            while (await two.get(text, headers=auth)).json()["text"] != "first, then":  # noqa: ASYNC110
                await trio.sleep(0.02)
    finally:
        await one.aclose()
        await two.aclose()


def drain(lines: Lines) -> list[str]:
    rest = []
    while True:
        try:
            rest.append(lines.receive.receive_nowait())
        except trio.WouldBlock:
            return rest


async def test_workers_that_keep_dying_make_the_group_give_up(
    aio_loop: None, data_dir: Path, database_url: str, redis_url: str
) -> None:
    # A "worker" that says it serves, then exits at once: a crash loop.
    crashing = [
        sys.executable,
        "-c",
        "print('atrium: API on http://x', flush=True); raise SystemExit(3)",
    ]
    settings = make_settings(
        data_dir,
        WORKERS="2",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        WS_PORT="",
        ENABLE_METRICS="false",
    )
    lines = Lines()
    with trio.fail_after(30), pytest.raises(SupervisorEscalation) as raised:
        await serve_until_it_fails(
            settings, crashing, lines.report, backoff=Backoff(base=0.0, maximum=0.0)
        )
    assert "gave up: more than 5 restarts" in str(raised.value)
    assert "exited with status 3" in str(raised.value)


async def test_a_worker_that_cannot_start_stops_the_group_at_once(
    aio_loop: None, data_dir: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        data_dir, WORKERS="2", DATABASE_URL=database_url, REDIS_URL=redis_url, WS_PORT=""
    )
    failing = [sys.executable, "-c", "print('no such setting'); raise SystemExit(2)"]
    lines = Lines()
    with trio.fail_after(30), pytest.raises(WorkerExited) as raised:
        await serve_until_it_fails(settings, failing, lines.report)
    assert str(raised.value) == "worker-1 exited while starting (status 2)"
    assert await lines.wait_for("no such setting") == "atrium[worker-1]: no such setting"


def test_reuse_port_sockets_share_a_port() -> None:
    with reuse_port_socket("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with reuse_port_socket("127.0.0.1", port) as second:
            first.listen()
            second.listen()
            assert second.getsockname()[1] == port


async def test_a_worker_that_never_says_where_it_listens_is_given_up_on(
    aio_loop: None,
    data_dir: Path,
    database_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process_group, "START_TIMEOUT", 0.5)
    settings = make_settings(
        data_dir, WORKERS="2", DATABASE_URL=database_url, REDIS_URL=redis_url, WS_PORT=""
    )
    silent = [sys.executable, "-c", "import time; time.sleep(30)"]
    with trio.fail_after(30), pytest.raises(WorkerExited) as raised:
        await serve_until_it_fails(settings, silent, print)
    assert str(raised.value) == "worker-1 did not start within 0.5 s"


def test_a_port_held_without_reuse_port_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="Address already in use"):
            reuse_port_socket("127.0.0.1", taken.getsockname()[1])


async def test_embedded_redis_needs_its_password_and_reports_its_death(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        # The port run.py --workers holds for its Redis: no other process can bind it (a
        # port picked and released could be taken before Redis binds it), Redis can.
        port = process_group._hold_port(stack)
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))
        redis = EmbeddedRedis(directory, tmp_path / "redis.log", port)
        with trio.fail_after(30), pytest.RaisesGroup(EmbeddedRedisError) as raised:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(redis.run)
                password = url.split("//:", 1)[1].split("@", 1)[0]
                assert url == f"redis://:{password}@127.0.0.1:{port}/0"
                assert oct((directory / "redis.conf").stat().st_mode & 0o777) == "0o600"
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(b"PING\r\n")
                    assert (await stream.receive_some()).startswith(b"-NOAUTH")
                assert await redis.answers()
                # redis-server names itself by its address (the session's Redis is another).
                title = f"redis-server 127.0.0.1:{port}".encode()
                server = next(pid for pid in descendants(os.getpid()) if title in command_line(pid))
                assert password.encode() not in command_line(server)  # ps shows command lines
                os.kill(server, signal.SIGKILL)  # run() raises: a supervisor would restart it
        assert str(raised.value.exceptions[0]) == "redis-server exited with status 137"
        # Dead, its port is still held for it, and the restart binds it again.
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(redis.run)
                assert await redis.answers()
                nursery.cancel_scope.cancel()


def test_each_worker_gets_the_shared_services_and_its_own_metrics_port(data_dir: Path) -> None:
    settings = make_settings(data_dir, METRICS_PORT="9100")
    env = worker_env(settings, 2, 8000, 8001, "postgresql://db", "unix:///r.sock", {"A": "1"})
    assert env["A"] == "1"
    assert (env["PORT"], env["WS_PORT"], env["METRICS_PORT"]) == ("8000", "8001", "9102")
    assert (env["WORKERS"], env["REUSE_PORT"]) == ("1", "true")
    assert (env["DATABASE_URL"], env["REDIS_URL"]) == ("postgresql://db", "unix:///r.sock")
    settings = make_settings(data_dir, METRICS_PORT="0")
    assert worker_env(settings, 1, 1, None, "d", "r", {})["METRICS_PORT"] == "0"


def test_workers_must_be_at_least_one(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="WORKERS: must be at least 1"):
        load_settings({"WORKERS": "0", "DATA_DIR": str(data_dir)})


async def test_line_reader_returns_a_last_partial_line() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"one\ntwo")
    await send.aclose()
    lines = _LineReader(receive)
    assert [await lines.next(), await lines.next(), await lines.next()] == ["one", "two", None]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.long
async def test_run_py_workers_with_embedded_services_stops_everything_on_sigterm(
    tmp_path: Path,
) -> None:
    # No DATABASE_URL, no REDIS_URL: the supervisor starts PostgreSQL and Redis once.
    env = worker_environ()
    env.update(
        DATA_DIR=str(tmp_path / "data"), PORT="0", WS_PORT="0", METRICS_PORT="0", ENVIRONMENT=""
    )
    env.pop("SECRET_KEY")
    log = tmp_path / "stderr.log"
    async with trio.open_nursery() as nursery:
        with log.open("wb") as stderr:
            try:
                served = await start_serving(nursery, env, stderr=stderr, args=("--workers", "2"))
            except AssertionError as error:  # say why: the group's own account of its exit
                tail = log.read_text(errors="replace")[-4000:]
                raise AssertionError(f"{error}; its stderr ended:\n{tail}") from None
        process = served.process
        async with httpx.AsyncClient(base_url=served.url, verify=CLIENT_TLS) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            assert (await client.get("/ready")).status_code == 200
        below = descendants(process.pid)
        commands = {pid: command_line(pid) for pid in below}
        assert sum(b"--supervised" in c for c in commands.values()) == 2
        assert any(b"redis-server" in c for c in commands.values())
        assert any(b"postgres\0" in c for c in commands.values())

        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        with trio.fail_after(60):
            rest = b""
            while chunk := await process.stdout.receive_some():
                rest += chunk
            assert await process.wait() == 0
    assert rest.count(b"]: stopped") == 2
    assert rest.endswith(b"atrium: stopped\n")
    assert [pid for pid in below if alive(pid)] == []


def test_run_py_workers_gives_up_with_one_line_when_its_port_is_taken(tmp_path: Path) -> None:
    env = worker_environ()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # without SO_REUSEPORT: nobody may share it
        env.update(DATA_DIR=str(tmp_path / "data"), PORT=str(taken.getsockname()[1]))
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), "--workers", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == "atrium: gave up: [Errno 98] Address already in use"
