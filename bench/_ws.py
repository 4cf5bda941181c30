"""A lean WebSocket client for benchmarks: thousands of connections on one epoll loop.

No framework and no event loop library: non-blocking sockets, ``select.epoll`` (level
triggered), an HTTP/1.1 upgrade written by hand, and the few parts of RFC 6455 a client
needs: masked text frames out; unmasked text/binary frames in (fragmented ones are
reassembled), ping answered with pong, close answered and recorded. A general client
(trio-websocket, ~22k messages/s on one core) would measure itself before the server;
this one costs a few microseconds per received frame.

The caller owns the loop: it calls ``Engine.poll(timeout)`` and gets each text message
through the connection's ``handler(conn, payload, now)`` (``now`` is ``perf_counter()``
right after the poll returned; ``payload`` is ``bytes``). Binary messages go to the same
handler.

Client frames are masked with a random key per connection, reused for its frames: the
server does the same unmasking work as for a browser; the key is not meant to be secret.
"""

from __future__ import annotations

import base64
import errno
import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Handler = Callable[["Conn", bytes, float], None]

_RECV_SIZE = 262_144
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLERR = select.EPOLLERR | select.EPOLLHUP
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

CONNECTING, UPGRADING, OPEN, CLOSED = range(4)


def _ignore(conn: Conn, payload: bytes, now: float) -> None:
    return None


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    repeat = (key * (n // 4 + 1))[:n]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(repeat, "little")
    return masked.to_bytes(n, "little")


class Conn:
    """One WebSocket client connection, driven by an ``Engine``."""

    __slots__ = (
        "engine",
        "sock",
        "fd",
        "state",
        "handler",
        "name",
        "close_code",
        "error",
        "_rbuf",
        "_wbuf",
        "_key",
        "_request",
        "_fragments",
        "_fragment_op",
        "_want_out",
        "opened_at",
        "ready",
        "last_seq",
        "drops",
        "count",
    )

    def __init__(
        self, engine: Engine, sock: socket.socket, request: bytes, handler: Handler, name: str
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.handler = handler
        self.name = name
        self.close_code: int | None = None
        self.error: str | None = None
        self._rbuf = b""
        self._wbuf = b""
        self._key = os.urandom(4)
        self._request = request
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._want_out = True
        self.opened_at = 0.0
        # Free for the caller's bookkeeping (the fan-out bench keeps per-receiver state here).
        self.ready = False
        self.last_seq = 0
        self.drops = 0
        self.count = 0

    # -- sending ---------------------------------------------------------------------------

    def frame(self, payload: bytes, opcode: int = 0x1) -> bytes:
        """The bytes of one masked, final frame (build several and ``send_raw`` them at once)."""
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65_536:
            header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        return header + self._key + _mask(payload, self._key)

    def send_text(self, payload: bytes) -> None:
        self.send_raw(self.frame(payload))

    def send_raw(self, data: bytes) -> None:
        """Write frame bytes now; what the socket does not take is sent when it is writable."""
        if self.state == CLOSED:
            return
        if self._wbuf or self.state != OPEN:
            self._wbuf += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lost(f"send: {error.strerror or error}")
            return
        if sent < len(data):
            self._wbuf = data[sent:]
            self._watch_out(True)

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort) and drop the socket without waiting."""
        if self.state == OPEN:
            try:
                self.sock.send(self.frame(code.to_bytes(2, "big"), 0x8))
            except OSError:
                pass
        self._finish()

    # -- engine callbacks ------------------------------------------------------------------

    def _watch_out(self, on: bool) -> None:
        if on != self._want_out and self.state != CLOSED:
            self._want_out = on
            self.engine._ep.modify(self.fd, _EPOLLIN | _EPOLLOUT if on else _EPOLLIN)

    def _writable(self) -> None:
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._lost(f"connect: {os.strerror(err)}")
                return
            self.state = UPGRADING
            self._wbuf = self._request + self._wbuf
        if self._wbuf:
            try:
                sent = self.sock.send(self._wbuf)
            except BlockingIOError:
                return
            except OSError as error:
                self._lost(f"send: {error.strerror or error}")
                return
            self._wbuf = self._wbuf[sent:]
        if not self._wbuf:
            self._watch_out(False)

    def _readable(self, now: float) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"recv: {error.strerror or error}")
            return
        if not data:
            self._lost("closed by the server" if self.state == OPEN else "eof")
            return
        buf = self._rbuf + data if self._rbuf else data
        if self.state == UPGRADING:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._rbuf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._lost(f"upgrade refused: {status.decode('latin-1')}")
                return
            self.state = OPEN
            self.opened_at = now
            buf = buf[end + 4 :]
            if self._wbuf:
                self._watch_out(True)
        self._rbuf = self._frames(buf, now)

    def _frames(self, buf: bytes, now: float) -> bytes:
        """Handle every complete frame in ``buf``; return the incomplete rest."""
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:  # servers must not mask
                self._lost("masked frame from the server")
                return b""
            end = start + length
            if end > n:
                break
            payload = buf[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                if b0 & 0x80:
                    self.handler(self, payload, now)
                else:
                    self._fragment_op, self._fragments = opcode, [payload]
            elif opcode == 0x0:
                self._fragments.append(payload)
                if b0 & 0x80:
                    message = b"".join(self._fragments)
                    self._fragments = []
                    self.handler(self, message, now)
            elif opcode == 0x9:
                self.send_raw(self.frame(payload, 0xA))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                reason = payload[2:].decode(errors="replace")
                self.error = f"closed by the server ({self.close_code} {reason})"
                self.close(self.close_code if self.close_code not in (1005, 1006) else 1000)
                return b""
            # 0xA (pong) and anything else: ignored
            if self.state == CLOSED:
                return b""
        return buf[pos:] if pos < n else b""

    def _lost(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self._finish()

    def _finish(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.engine._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass(slots=True)
class Engine:
    """Many connections, one ``epoll``; the caller drives it with ``poll``."""

    _ep: select.epoll = field(default_factory=select.epoll)
    _conns: dict[int, Conn] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._conns)

    def connect(
        self,
        host: str,
        port: int,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        handler: Handler = _ignore,
        name: str = "",
        source: str | None = None,
    ) -> Conn:
        """Start connecting (non-blocking); the upgrade request goes out once connected.
        ``source``: the local address to connect from (127.0.0.2, ...: each loopback
        address has its own ephemeral ports)."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        if source is not None:
            # The port is picked at connect, per destination: not one of bind's ~28,000.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        conn = Conn(self, sock, request, handler, name)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            conn.state = CLOSED
            conn.error = f"connect: {os.strerror(code)}"
            return conn
        self._conns[conn.fd] = conn
        self._ep.register(conn.fd, _EPOLLIN | _EPOLLOUT)
        return conn

    def poll(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for I/O and handle it; returns the number of events."""
        events = self._ep.poll(timeout if timeout > 0 else 0)
        if not events:
            return 0
        now = time.perf_counter()
        conns = self._conns
        for fd, mask in events:
            conn = conns.get(fd)
            if conn is None:
                continue
            if mask & _EPOLLOUT:
                conn._writable()
            if mask & (_EPOLLIN | _EPOLLERR) and conn.state != CLOSED:
                conn._readable(now)
        return len(events)

    def run_for(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Poll for ``seconds`` or until ``until()`` is true (checked between polls)."""
        deadline = time.perf_counter() + seconds
        while True:
            if until is not None and until():
                return True
            left = deadline - time.perf_counter()
            if left <= 0:
                return until is None
            self.poll(min(left, 0.05))

    def close_all(self, conns: Iterable[Conn] | None = None) -> None:
        for conn in list(self._conns.values() if conns is None else conns):
            conn.close()

    def _forget(self, conn: Conn) -> None:
        if self._conns.pop(conn.fd, None) is not None:
            try:
                self._ep.unregister(conn.fd)
            except OSError:
                pass
