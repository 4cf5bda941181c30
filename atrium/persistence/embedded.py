"""An embedded PostgreSQL (pgserver's binaries) for when no DATABASE_URL is given.

atrium runs the server itself rather than through ``pgserver.get_server``, for three
promises pgserver does not keep:

- It is watched. PostgreSQL runs as the child of a small guard process
  (``_pg_guard.py``), itself atrium's child: when the postmaster dies, the guard exits and
  :meth:`EmbeddedPostgres.run` raises, so the supervisor starts it again.
- It never outlives atrium. The guard stops PostgreSQL when its pipe from atrium closes,
  which the kernel does even when atrium is SIGKILLed; a postmaster still found running in
  the data directory with no live atrium behind it (an older layout, a killed guard) is
  stopped before a new one starts. pgserver's own bookkeeping (a list of handle PIDs that
  keeps dead ones) is not used.
- Its Unix socket is private. The socket lives in the data directory, or, when that path
  is too long for a socket, in a fresh ``mkdtemp`` directory (mode 0700) made for this
  process; an existing path in the temporary directory is never trusted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .guarded import GUARD, STOP_TIMEOUT, run_guarded

log = logging.getLogger("atrium.embedded")

_SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; pgserver's user is reused
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 100  # a Unix socket path must fit in 107 bytes
_START_TIMEOUT = 60.0
_POLL = 0.05


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started (or an orphan of it stopped)."""


class PostmasterExited(EmbeddedPostgresError):
    """The running PostgreSQL ended without being asked to (a crash, a kill)."""


def _bin_path() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (servers, CI); harmless.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir/pg``, started (and restarted) under a guard.

    Call :meth:`prepare` once (blocking: initdb on first use, the socket directory), then
    either await :meth:`run` as a supervised child or use :meth:`start_blocking` from
    synchronous code; :meth:`close` removes a private socket directory at the end. The URL
    stays the same across restarts, so a connection pool outlives the server's crashes.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self.system_user = _SYSTEM_USER if os.geteuid() == 0 else None
        self.socket_dir = self.pgdata
        self._private_socket_dir = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres:@/postgres?host={self.socket_dir}"

    @property
    def log_path(self) -> Path:
        return self.pgdata / "log"

    def prepare(self) -> None:
        """Create and initialise the data directory if needed; choose the socket directory.

        Raises EmbeddedPostgresError when initdb fails.
        """
        self.pgdata.mkdir(parents=True, exist_ok=True)
        bin_path = _bin_path()
        if self.system_user is not None:
            self._grant_system_user(bin_path)
        if not (self.pgdata / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(bin_path / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "--auth=trust",
                    "--auth-local=trust",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                ],
                user=self.system_user,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise EmbeddedPostgresError(f"initdb failed: {result.stderr.strip()}")
        if len(str(self.pgdata / _SOCKET_NAME)) > _MAX_SOCKET_PATH:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="atrium-pg-"))
            self._private_socket_dir = True
            if self.system_user is not None:
                import pwd

                entry = pwd.getpwnam(self.system_user)
                os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)

    def _grant_system_user(self, bin_path: Path) -> None:
        """As root: the PostgreSQL user exists, owns the data and can reach the binaries."""
        import pwd
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )
        assert self.system_user is not None
        ensure_user_exists(self.system_user)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(bin_path)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_path.parent / "lib", read)
        entry = pwd.getpwnam(self.system_user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def close(self) -> None:
        """Remove the private socket directory, if one was made."""
        if self._private_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def guard_command(self) -> list[str]:
        """The command line of the guard that runs this cluster's postmaster."""
        postgres = _bin_path() / "postgres"
        return [
            sys.executable, str(GUARD), str(self.log_path), self.system_user or "",
            str(postgres), "-D", str(self.pgdata), "-h", "", "-k", str(self.socket_dir),
        ]  # fmt: skip

    def postmaster_pid(self) -> int | None:
        """The PID recorded in ``postmaster.pid`` (running or stale), or None."""
        lines = _lockfile(self.pgdata)
        return int(lines[0]) if lines and lines[0].strip().isdigit() else None

    def ready_under(self, guard_pid: int) -> bool:
        """Whether the postmaster started by the guard ``guard_pid`` accepts connections."""
        lines = _lockfile(self.pgdata)
        if len(lines) < 8 or lines[7].strip() != "ready" or not lines[0].strip().isdigit():
            return False
        stat = _proc_stat(int(lines[0]))
        return stat is not None and stat[1] == guard_pid

    def stop_orphan(self) -> None:
        """Stop a postmaster running in this data directory that no live atrium owns (its
        atrium was SIGKILLed, or it was started by an older atrium through pg_ctl): fast
        shutdown, then immediate, then SIGKILL.

        Raises EmbeddedPostgresError when a running atrium's guard owns it (the data
        directory is in use) or it cannot be stopped.
        """
        pid = self.postmaster_pid()
        if pid is None or not _is_postmaster_of(pid, self.pgdata):
            return
        stat = _proc_stat(pid)
        parent = stat[1] if stat is not None else 0
        if any(GUARD.name in arg for arg in _cmdline(parent)):
            raise EmbeddedPostgresError(
                f"{self.pgdata} is in use by another atrium (guard process {parent})"
            )
        log.warning("stopping PostgreSQL %d, left running in %s by a dead atrium", pid, self.pgdata)
        for sig, seconds in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if not _is_postmaster_of(pid, self.pgdata):
                    return
                time.sleep(_POLL)
        raise EmbeddedPostgresError(f"could not stop PostgreSQL {pid} in {self.pgdata}")

    # -- as a supervised child ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start PostgreSQL under its guard, report the URL once it accepts connections, and
        run until it ends: then raise PostmasterExited (the supervisor restarts it, and
        PostgreSQL recovers from its log). Cancelling stops it with a fast shutdown.

        Raises EmbeddedPostgresError when it does not come up within 60 s.
        """
        await trio.to_thread.run_sync(self.stop_orphan)

        async def ready(guard_pid: int) -> bool:
            return self.ready_under(guard_pid)

        await run_guarded(
            self.guard_command(),
            name="PostgreSQL",
            ready=ready,
            start_timeout=_START_TIMEOUT,
            poll=_POLL,
            log_path=self.log_path,
            start_error=EmbeddedPostgresError,
            exit_error=PostmasterExited,
            up=f"PostgreSQL is up in {self.pgdata}",
            started=self.url,
            task_status=task_status,
        )

    # -- from synchronous code ----------------------------------------------------------------

    def start_blocking(self) -> subprocess.Popen[bytes]:
        """Start PostgreSQL under its guard and wait until it accepts connections; stop it
        with :func:`stop_blocking`. Raises EmbeddedPostgresError."""
        self.stop_orphan()
        guard = subprocess.Popen(
            self.guard_command(), stdin=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.ready_under(guard.pid):
            if guard.poll() is not None or time.monotonic() > deadline:
                stop_blocking(guard)
                raise EmbeddedPostgresError(f"PostgreSQL did not start; see {self.log_path}")
            time.sleep(_POLL)
        return guard


def stop_blocking(guard: subprocess.Popen[bytes]) -> None:
    """Stop PostgreSQL by closing its guard's pipe, and wait for both to end."""
    assert guard.stdin is not None
    guard.stdin.close()
    try:
        guard.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        guard.kill()  # the postmaster then gets SIGINT from the kernel (PDEATHSIG)
        guard.wait()


@contextmanager
def open_embedded(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A prepared :class:`EmbeddedPostgres` for ``data_dir`` (not started), closed after."""
    cluster = EmbeddedPostgres(data_dir)
    cluster.prepare()
    try:
        yield cluster
    finally:
        cluster.close()


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start PostgreSQL with its data in ``data_dir/pg``; yield its URL.

    The data survives a restart; the server stops when the block ends, or when this
    process dies. Unsupervised: for commands and test sessions (``serve`` runs
    :meth:`EmbeddedPostgres.run` under its supervisor instead).
    """
    with open_embedded(data_dir) as cluster:
        guard = cluster.start_blocking()
        try:
            yield cluster.url
        finally:
            stop_blocking(guard)


# -- /proc, for the orphan check (Linux) -----------------------------------------------------


def _lockfile(pgdata: Path) -> list[str]:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return []


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (command) "
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) postgres serving ``pgdata``."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "postgres" and str(pgdata) in argv
