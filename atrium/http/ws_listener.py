"""The dedicated WebSocket listener on WS_PORT: same paths, same frames, fewer layers.

For high fan-out deployments a load balancer routes ``/ws/`` here; it skips the ASGI
layers and serves the same protocol through the same ``Realtime``. It is wsproto over
sockets it owns, as hypercorn is: the opening handshake (wsproto's ``H11Handshake``, under
a timeout), then wsproto's ``Connection`` for frames in, pings and the close handshake.
Frames out are framed here and written straight to the socket (``try_send``, and
``try_send_bytes`` for a document's binary frames), which
is what makes fan-out cheap: no task switch, no queue and no wsproto per delivery. What
it takes from wsproto, and the frames it writes itself, live in the seam
``atrium.seams.wsproto_server``. Live documents (``/ws/documents/{room}``, binary frames)
are served here too, by ``DocumentSessions``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..core.failures import ContainedFailures
from ..domain.document_sessions import DocumentHandshake
from ..domain.realtime import ConnectionGone, Handshake
from ..realtime.outbox import PARTIAL, REFUSED, SENT
from ..seams.wsproto_server import (
    NOT_SIMPLE,
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    CloseReason,
    Connection,
    ConnectionState,
    ConnectionType,
    Event,
    H11Handshake,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    RemoteProtocolError,
    Request,
    TextMessage,
    binary_frame,
    client_frame,
    text_frame,
)
from .json import error_body
from .reuseport import reuse_port_socket

log = logging.getLogger("atrium.ws")

# A client has this long to send its upgrade request once connected.
HANDSHAKE_TIMEOUT = 10.0
# After our close frame, how long the peer has to answer with its own before the TCP
# connection is closed anyway; also the longest a control frame may wait for the socket.
CLOSE_TIMEOUT = 2.0
RECEIVE_SIZE = 65536
# accept() errors that say the process is out of something: wait, then accept again.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_NOT_FOUND = error_body("not_found", "No WebSocket endpoint at this path")
# Past (open-file limit - OPEN_FILES_RESERVE) open files, a new connection is answered 503
# server_busy: the reserve keeps files for the database, the main port and the refusals.
OPEN_FILES_RESERVE = 1000
RETRY_AFTER_SECONDS = 5
_BUSY = error_body("server_busy", "This server holds all the connections it can; retry later")


class Sessions(Protocol):
    """Where the listener hands accepted connections: ``Realtime``."""

    failures: ContainedFailures

    async def serve(
        self, conn: ListenerConnection, handshake: Handshake, *, transport: str
    ) -> None: ...


class DocumentServing(Protocol):
    """Where the listener hands accepted document sockets: ``DocumentSessions``."""

    async def serve(
        self, conn: ListenerConnection, handshake: DocumentHandshake, *, transport: str
    ) -> None: ...


class ListenerConnection:
    """One accepted socket: the WebSocket handshake, then the session's ``Connection``
    with a direct write (``DirectWrite``).

    Every write goes through one gate (a lock) so frames never interleave: ``send``,
    ``flush`` and ``close`` from the session's tasks, pongs and the answer to the peer's
    close from the receiving task. ``try_send`` (the workspace's task) writes only when the
    gate is free and nothing is owed. What a write could not finish (a partial direct
    write, or an async write cancelled while it waited for the socket) is kept in
    ``_pending``; whoever writes next writes it first, so a frame is never torn. No
    extension is ever negotiated, so a data frame is a header and the payload.

    Frames in: whole, simple frames (``client_frame``: final, masked, text or binary, in
    the size limit) are read here; at the first other frame (a ping, a fragment, a close,
    anything wrong) a wsproto ``Connection`` is made and reads the stream from there on,
    as it does once the connection closes. An idle connection holds neither wsproto nor
    the bytes it last received.
    """

    __slots__ = (
        "_sock",
        "_ws",
        "_gate",
        "_pending",
        "_writable",
        "_max_size",
        "_buffer",
        "_size",
        "_unread",
        "_drained",
        "_yielded",
    )

    def __init__(self, sock: socket.socket, *, max_message_size: int) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already reset by the peer: the first read says so
            pass
        self._sock = sock
        self._ws: Connection | None = None  # wsproto, from the first frame it must read
        self._unread = b""  # bytes received and not read yet (before wsproto)
        self._drained = False  # the last read emptied the socket: wait before reading
        self._yielded = False  # this receive let other tasks run
        self._gate = trio.Lock()
        self._pending = b""
        self._writable = False  # True from the 101 until our close frame (or a dead socket)
        self._max_size = max_message_size
        self._buffer: io.StringIO | io.BytesIO | None = None  # a fragmented message
        self._size = 0  # of the message being received

    # -- the opening handshake --------------------------------------------------------------

    async def open(self, *, busy: bool = False) -> Handshake | DocumentHandshake | None:
        """Read the upgrade request and answer it: 101 for ``/ws/{project_id}[/{user_id}]``
        and ``/ws/documents/{room}``, 404 for any other path, 400 (or wsproto's hint) for a
        malformed request; when ``busy`` (near the open-file limit), 503 ``server_busy``
        with ``Retry-After`` for every request. Returns the handshake of an accepted
        connection, else None (also on timeout or a peer that left); the caller then
        closes it."""
        shake = H11Handshake(ConnectionType.SERVER)
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while True:
                for event in shake.events():
                    if isinstance(event, Request):
                        if busy:
                            await self._reject(shake, 503, _BUSY, RETRY_AFTER_SECONDS)
                            return None
                        return await self._answer(shake, event)
                data = await self._receive_some()
                if not data:
                    return None
                try:
                    shake.receive_data(data)
                except RemoteProtocolError as error:
                    await self._reply_handshake(shake, error.event_hint or RejectConnection())
                    return None
                except UnicodeError:  # a target or host that is not ASCII / IDNA
                    await self._reply_handshake(shake, RejectConnection())
                    return None
        return None

    async def _answer(
        self, shake: H11Handshake, request: Request
    ) -> Handshake | DocumentHandshake | None:
        path, _, query = request.target.partition("?")
        handshake: Handshake | DocumentHandshake | None = DocumentHandshake.parse(
            path, query, request.extra_headers
        ) or Handshake.parse(path, query, request.extra_headers)
        if handshake is None:
            await self._reject(shake, 404, _NOT_FOUND)
            return None
        await self._write(shake.send(AcceptConnection()))
        self._writable = True
        return handshake

    async def _reject(
        self, shake: H11Handshake, status: int, body: bytes, retry_after: int | None = None
    ) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await self._reply_handshake(
            shake,
            RejectConnection(status_code=status, headers=headers, has_body=True),
            RejectData(data=body),
        )

    async def _reply_handshake(self, shake: H11Handshake, *events: Event) -> None:
        await self._write(b"".join(shake.send(event) for event in events))

    # -- Connection ---------------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message. Answers pings and the peer's close on the way; closes with
        1009 a message over ``max_message_size`` and with the parser's code (1002, 1007)
        a broken stream. Raises ConnectionGone once the connection is closing or gone."""
        self._yielded = False
        while self._writable:
            ws = self._ws
            if ws is None:
                found = client_frame(self._unread, self._max_size)
                if found is NOT_SIMPLE:
                    self._wsproto()
                    continue
                if found is not None:
                    opcode, payload, taken = found
                    if opcode == 1:
                        try:
                            text = payload.decode()
                        except UnicodeDecodeError:
                            self._wsproto()  # its 1007
                            continue
                    self._unread = self._unread[taken:]
                    if not self._yielded:  # a client that floods us must not starve the rest
                        await trio.lowlevel.checkpoint()
                    return text if opcode == 1 else payload
            else:
                message = await self._wsproto_message(ws)
                if message is not None:
                    if not self._yielded:
                        await trio.lowlevel.checkpoint()
                    return message
                if not self._writable:
                    break
            data = await self._receive_some()
            if not data:
                self._writable = False
                raise ConnectionGone()
            if self._ws is None:
                self._unread += data
            else:  # made meanwhile (a close sent by the session)
                self._ws.receive_data(data)
            del data  # not held while the connection idles
        raise ConnectionGone()

    def _wsproto(self) -> Connection:
        """The wsproto ``Connection`` that reads the stream from now on (made now if
        need be, given the bytes not read yet)."""
        ws = self._ws
        if ws is None:
            ws = self._ws = Connection(ConnectionType.SERVER)
            if self._unread:
                ws.receive_data(self._unread)
                self._unread = b""
        return ws

    async def _wsproto_message(self, ws: Connection) -> str | bytes | None:
        """The next message among wsproto's events, handling the others on the way; None
        when it needs more bytes (or the connection is closing: ``_writable`` is False).
        Raises ConnectionGone."""
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._size += len(event.data)
                if self._size > self._max_size:
                    await self._send_event(
                        CloseConnection(CloseReason.MESSAGE_TOO_BIG, "message_too_big")
                    )
                    raise ConnectionGone()
                message = self._message(event)
                if message is not None:
                    return message
            elif isinstance(event, Ping):
                await self._send_event(event.response())
            elif isinstance(event, CloseConnection):
                # The peer's close frame (REMOTE_CLOSING: answer it), or a stream the
                # parser gave up on (still OPEN: close with its code, 1002 or 1007).
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    event = event.response()
                await self._send_event(event)
                raise ConnectionGone()
            if not self._writable:
                return None
        return None

    def _message(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """The message ``event`` completes, if it does (fragments are kept until then)."""
        if event.message_finished and self._buffer is None:  # one frame: most messages
            self._size = 0
            return event.data if isinstance(event, TextMessage) else bytes(event.data)
        buffer = self._buffer
        if isinstance(event, TextMessage):
            if not isinstance(buffer, io.StringIO):
                buffer = self._buffer = io.StringIO()
            buffer.write(event.data)
        else:
            if not isinstance(buffer, io.BytesIO):
                buffer = self._buffer = io.BytesIO()
            buffer.write(event.data)
        if not event.message_finished:
            return None
        self._buffer, self._size = None, 0
        return buffer.getvalue()

    def try_send(self, text: str) -> int:
        """Write one text frame now if the socket takes it without waiting: REFUSED
        (nothing written: the gate is taken, something is owed, or the connection is
        closing), SENT, or PARTIAL (the rest is owed: ``flush``). Never raises."""
        if not self._writable or self._pending or self._gate.locked():
            return REFUSED
        return self._try_write(text_frame(text))

    def try_send_bytes(self, data: bytes) -> int:
        """``try_send`` for one binary frame (a live document's)."""
        if not self._writable or self._pending or self._gate.locked():
            return REFUSED
        return self._try_write(binary_frame(data))

    def _try_write(self, frame: bytes) -> int:
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return REFUSED  # the send task meets the error and ends the session
        if sent == len(frame):
            return SENT
        self._pending = frame[sent:]
        return PARTIAL

    async def send(self, text: str) -> None:
        """Send one text frame, waiting for the socket. Raises ConnectionGone."""
        async with self._gate:
            if not self._writable:
                raise ConnectionGone()
            await self._write_locked(text_frame(text))

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame, waiting for the socket. Raises ConnectionGone."""
        async with self._gate:
            if not self._writable:
                raise ConnectionGone()
            await self._write_locked(binary_frame(data))

    async def flush(self) -> None:
        """Send what a direct write left unsent. Raises ConnectionGone."""
        async with self._gate:
            if self._pending:
                await self._write_locked(b"")

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame (after the rest of a frame begun). Never raises; the
        caller bounds the wait. ``aclose`` then waits for the peer's answer."""
        try:
            await self._send_event(CloseConnection(code, reason))
        except ConnectionGone:
            pass

    async def aclose(self) -> None:
        """Finish the close handshake and close the socket; never raises.

        Once our close frame is out, the peer has ``CLOSE_TIMEOUT`` to answer (closing
        first with unread data would reset the connection, and the peer might lose the
        close frame); a peer that never took the whole close frame is dropped at once.
        """
        ws = self._ws
        try:
            if ws is not None and not self._pending and ws.state is ConnectionState.LOCAL_CLOSING:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    while ws.state is ConnectionState.LOCAL_CLOSING:
                        if any(isinstance(e, CloseConnection) for e in ws.events()):
                            break  # the answer, or a stream too broken to wait for one
                        data = await self._receive_some()
                        if not data:
                            break
                        ws.receive_data(data)
        finally:
            self._writable = False
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    @property
    def max_message_size(self) -> int:
        """Messages larger than this close the connection with 1009."""
        return self._max_size

    @max_message_size.setter
    def max_message_size(self, size: int) -> None:
        self._max_size = size

    # -- bytes ------------------------------------------------------------------------------

    async def _send_event(self, event: CloseConnection | Pong) -> None:
        """Send a control frame (a pong or a close) through the gate, within
        ``CLOSE_TIMEOUT``: a peer that does not take even that is gone."""
        ws = self._wsproto()  # it keeps the close handshake's state
        with trio.move_on_after(CLOSE_TIMEOUT) as waited:
            async with self._gate:
                if not self._writable:
                    raise ConnectionGone()
                data = ws.send(event)
                if ws.state is not ConnectionState.OPEN:
                    self._writable = False  # no data frame after a close frame
                await self._write_locked(data)
        if waited.cancelled_caught:
            self._writable = False
            raise ConnectionGone()

    async def _write(self, data: bytes) -> None:
        async with self._gate:
            await self._write_locked(data)

    async def _write_locked(self, data: bytes) -> None:
        # Holding the gate: what a write left owed first. If the wait for a writable
        # socket is cancelled, what is left stays owed (``_pending``), never torn.
        if self._pending:
            data, self._pending = self._pending + data, b""
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self._writable = False
                raise ConnectionGone() from error
            view = view[sent:]
            if view:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except BaseException:
                    self._pending = bytes(view)
                    raise

    async def _receive_some(self) -> bytes:
        """Bytes from the socket, waiting for them; b"" once the peer is gone. After a
        read that emptied the socket, it waits first (a read would find nothing)."""
        if self._drained:
            self._yielded = True
            await trio.lowlevel.wait_readable(self._sock)
        while True:
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                self._yielded = True
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError:  # reset, or closed under us
                return b""
            self._drained = len(data) < RECEIVE_SIZE
            return data


class OpenFiles:
    """Whether the process is near its open-file limit, checked at each accept.

    Open files are counted as the larger of the accepted socket's number plus one (the
    kernel hands out the lowest free number, so every lower one is open) and the files
    open when the listener started plus the connections it holds now.
    """

    __slots__ = ("limit", "reserve", "_base", "held", "_busy")

    def __init__(self, limit: int | None = None, reserve: int = OPEN_FILES_RESERVE) -> None:
        if limit is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
        self.limit = limit
        self.reserve = reserve
        try:
            self._base = len(os.listdir("/proc/self/fd"))
        except OSError:  # no procfs: the socket numbers alone
            self._base = 0
        self.held = 0
        self._busy = False

    def busy(self, sock: socket.socket) -> bool:
        """Whether a connection accepted as ``sock`` must be refused (503 server_busy)."""
        open_files = max(sock.fileno() + 1, self._base + self.held)
        busy = open_files > self.limit - self.reserve
        if busy != self._busy:
            self._busy = busy
            if busy:
                log.warning(
                    "WebSocket listener refusing new connections (503 server_busy):"
                    " %d open files, limit %d",
                    open_files,
                    self.limit,
                )
            else:
                log.warning("WebSocket listener accepting connections again")
        return busy


async def _serve_connection(
    sessions: Sessions,
    documents: DocumentServing | None,
    sock: socket.socket,
    max_message_size: int,
    document_max_message_size: int,
    busy: bool = False,
) -> None:
    """One connection, inside its failure boundary: the handshake here, the session in
    ``sessions.serve`` (a document's in ``documents.serve``). An exception never reaches
    the listener that serves everyone."""
    conn = ListenerConnection(sock, max_message_size=max_message_size)
    try:
        try:
            handshake = await conn.open(busy=busy)
        except ConnectionGone:
            return  # the peer left during the handshake
        except Exception as error:
            sessions.failures.record("connection", error, {"transport": "listener"})
            return
        if isinstance(handshake, DocumentHandshake):
            if documents is None:
                await conn.close(CloseReason.NORMAL_CLOSURE, "no_documents_here")
            else:
                conn.max_message_size = document_max_message_size
                await documents.serve(conn, handshake, transport="listener")
        elif handshake is not None:
            serving = sessions.serve(conn, handshake, transport="listener")
            del handshake  # not held here for the connection's life (the token)
            await serving
    finally:
        await conn.aclose()


async def _listening_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Non-blocking sockets listening on every address ``host`` resolves to (with
    ``reuse_port``, on the one address hypercorn would bind, sharing the port)."""
    if reuse_port:
        sock = reuse_port_socket(host, port)
        sock.listen(0xFFFF)
        sock.setblocking(False)
        return [sock]
    found = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Port 0: the kernel picks it for the first address, the others follow it.
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
            sock.listen(0xFFFF)  # the kernel caps it at net.core.somaxconn
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


async def _accept_forever(
    listener: socket.socket,
    nursery: trio.Nursery,
    handle: Callable[[socket.socket, bool], Awaitable[None]],
    open_files: OpenFiles,
) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as error:
            if error.errno not in _OUT_OF_RESOURCES:
                continue  # this one connection failed (ECONNABORTED, ...): the next
            log.error("WebSocket listener cannot accept: %s; retrying", error)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle, sock, open_files.busy(sock))
        await trio.lowlevel.checkpoint()


async def serve_listener(
    sessions: Sessions,
    host: str,
    port: int,
    *,
    max_message_size: int,
    documents: DocumentServing | None = None,
    document_max_message_size: int | None = None,
    reuse_port: bool = False,
    open_files: OpenFiles | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve workspaces (and, given ``documents``, live documents, whose messages may be
    up to ``document_max_message_size``) on ``host:port`` until cancelled;
    ``started(port)`` once listening (with port 0, the port of the first address ``host``
    resolves to). ``reuse_port``: share the port with other processes (SO_REUSEPORT;
    ``run.py --workers``). ``open_files``: when to refuse new connections (default:
    ``OPEN_FILES_RESERVE`` below the process's soft open-file limit)."""
    document_max_size = document_max_message_size or max_message_size
    files = open_files or OpenFiles()
    listeners = await _listening_sockets(host, port, reuse_port)
    try:
        bound = listeners[0].getsockname()[1]
        log.info("WebSocket listener on ws://%s:%s/ws/", host, bound)

        async def handle(sock: socket.socket, busy: bool) -> None:
            files.held += 1
            try:
                await _serve_connection(
                    sessions, documents, sock, max_message_size, document_max_size, busy
                )
            finally:
                files.held -= 1

        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_forever, listener, nursery, handle, files)
            task_status.started(bound)
    finally:
        for listener in listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()
