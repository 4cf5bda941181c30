"""Live document connections: tickets, and the y-websocket sockets they open.

A client first asks REST for a ticket (``issue_ticket``: membership checked, the document
found or created, a ticket signed for this user, login session, project and document),
then opens ``/ws/documents/{room}?ticket=...`` on either transport. ``serve`` runs that
socket as a ``_DocumentConnection``: origin, ticket (against the URL's room), the login
session and the membership checked again in PostgreSQL (a ticket lives DOC_TICKET_SECONDS:
a member removed since is refused), then ``Attach`` to the document's actor, a receive
loop that hands each binary y-websocket message to the actor (``Incoming``), and a send
task that drains the connection's bounded ``Outbox[bytes]`` (a client that falls behind is
closed with 4008). ``Detach`` on the way out. The failure boundary is ``Realtime.serve``'s:
an unexpected exception ends that connection alone with 1011.

Sockets are indexed in ``Realtime.connections`` beside the workspace sockets, so a user's
connection bound covers both and revoking a login session (logout) closes both. Each
project's committed events pass through ``publish``: a member removed (4005) or whose role
changed (4014, reconnect to get the new role) is closed at once, as is every socket of a
deleted project (4006). Each open socket also checks its session and membership again
every DOC_TICKET_SECONDS, which bounds how long a change committed by another process
(which this one does not hear of) goes unnoticed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl

import trio

from ..actors import ActorStopped, AskTimeout
from ..actors.document import Attach, Detach, DocumentActor, Incoming, Peer
from ..core.config import Settings
from ..core.events import Event, EventType
from ..core.failures import ContainedFailures
from ..core.logs import bind, log_context
from ..core.metrics import Metrics
from ..core.roles import Role
from ..identity.tickets import Ticket, TicketCodec
from ..identity.tokens import TokenError
from ..persistence import accounts, projects
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.documents import DocumentNotFound
from ..realtime.outbox import Outbox
from ..realtime.protocol import CloseCode
from .documents import Documents
from .realtime import (
    ConnectionGone,
    Realtime,
    count_sent,
    drain_outbox,
    origin_allowed,
    stop_sending,
)

log = logging.getLogger("atrium.documents")

# Users whose message budget is remembered with no socket open, before refilled ones are
# forgotten.
_KEPT_RATES = 4096

_CLOSE_TIMEOUT = 2.0

# A client whose connection ended before the update it holds arrived (over
# DOC_MAX_UPDATE_BYTES, say) offers it again on the next: y-websocket reconnects 0.1 s after
# a close and resends its whole state. Its next connections are held open (the provider
# waits on an open socket) before they are served (``FailedUploads``).
_FIRST_MESSAGE_SECONDS = 5.0
_HELD_MESSAGES = 64
_SYNC_STEP1 = b"\x00\x00"
_SYNC_STEP2 = b"\x00\x01"
_EMPTY_STEP1 = b"\x00\x00\x01\x00"  # a client that holds nothing
_REFUSED_UPLOADS = (CloseCode.MESSAGE_TOO_BIG, CloseCode.DOCUMENT_TOO_LARGE)
_DOCUMENTS_PATH = "/ws/documents/"
DOCUMENT_FRAMING = 16
"""Bytes of y-websocket framing around one update: a message is at most
DOC_MAX_UPDATE_BYTES plus these."""


class BinaryConnection(Protocol):
    """What a transport gives a document connection: messages in, binary frames out."""

    async def receive(self) -> str | bytes:
        """The next message. Raises ConnectionGone."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame. Raises ConnectionGone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (best effort; never raises)."""
        ...


@runtime_checkable
class DirectBinaryWrite(Protocol):
    """A ``BinaryConnection`` that can also write without waiting (the listener's): the
    outbox then hands frames straight to the socket while nothing is queued
    (``Outbox.direct``), and the send task flushes what a PARTIAL write left owed."""

    def try_send_bytes(self, data: bytes) -> int:
        """Write one binary frame now if the socket takes it without waiting: REFUSED
        (nothing written: queue it), SENT, or PARTIAL (the rest is owed: ``flush``).
        Never raises."""
        ...

    async def flush(self) -> None:
        """Send what a direct write left unsent. Raises ConnectionGone."""
        ...


@dataclass(frozen=True, slots=True)
class DocumentHandshake:
    """What a client asked for at ``/ws/documents/{room}?ticket=...``."""

    room: str
    ticket: str
    headers: Mapping[str, str]

    @classmethod
    def parse(
        cls, path: str, query: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> DocumentHandshake | None:
        """The handshake of a request for ``/ws/documents/{room}``, else None."""
        if not path.startswith(_DOCUMENTS_PATH):
            return None
        room = path[len(_DOCUMENTS_PATH) :]
        if not room or "/" in room:
            return None
        wanted = {
            name: value.decode("latin-1")
            for raw, value in headers
            if (name := raw.decode("latin-1").lower()) in ("origin", "host")
        }
        ticket = dict(parse_qsl(query)).get("ticket", "")
        return cls(room[:64], ticket, wanted)


@dataclass(frozen=True, slots=True)
class DocumentConnectionSettings:
    """Limits of each document connection: ``max_message_bytes`` per message (1009 over
    it), ``updates_per_second`` (bursts of twice that) across one user's document
    connections (4010 over it), ``send_queue`` frames waiting (4008 over it). Every
    ``recheck_seconds`` (DOC_TICKET_SECONDS: no longer than a ticket lives) an open
    connection checks its login session and membership again."""

    max_message_bytes: int
    updates_per_second: float
    send_queue: int
    recheck_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> DocumentConnectionSettings:
        """From a process's settings: a message holds at most one update of
        DOC_MAX_UPDATE_BYTES and its few bytes of framing."""
        return cls(
            max_message_bytes=settings.doc_max_update_bytes + DOCUMENT_FRAMING,
            updates_per_second=settings.doc_updates_per_second,
            send_queue=settings.ws_send_queue,
            recheck_seconds=max(1, settings.doc_ticket_seconds),
        )


@dataclass(frozen=True, slots=True)
class IssuedTicket:
    """A signed ticket, the room it opens and how long it may open connections."""

    ticket: str
    room: str
    expires_in: int


class NotAMember(Exception):
    """No such project, or the user is not a member of it (answer 404)."""


class _RefusedConnection(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class _FailedUpload:
    """A client's last connection ended before what it holds arrived: how many times in
    a row, and when last."""

    strikes: int
    at: float


class FailedUploads:
    """The clients whose connection ended before what they hold arrived (refused as too
    large, or cut), by user and document and the client's sync step 1 (its ``hello``:
    the state vector it connected with), so that the same client's next connections
    are held off: ``hold_for`` is 1 s, 2 s, 4 s... at most ``HOLD_MAX`` after one, two,
    three... failures in a row. A client is forgotten when its upload arrives
    (``succeeded``) or after ``FORGOTTEN`` seconds without a failure. Bounded: the
    least recently failed are forgotten first. ``clock`` is seconds (trio's)."""

    HOLD_MAX = 20.0
    """Under y-websocket's 30 s without a message, after which it reconnects by itself."""
    FORGOTTEN = 60.0

    def __init__(
        self,
        clock: Callable[[], float] = trio.current_time,
        *,
        max_keys: int = 4096,
        max_clients: int = 8,
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._max_clients = max_clients
        self._failed: dict[tuple[uuid.UUID, uuid.UUID], dict[bytes, _FailedUpload]] = {}

    def __bool__(self) -> bool:
        return bool(self._failed)

    def __contains__(self, key: tuple[uuid.UUID, uuid.UUID]) -> bool:
        return key in self._failed

    def failed(self, key: tuple[uuid.UUID, uuid.UUID], hello: bytes) -> None:
        """The user's client that said ``hello`` on the document (``key``: user,
        document) left, or was closed, before what it holds arrived."""
        now = self._clock()
        clients = self._failed.pop(key, None) or {}
        known = clients.pop(hello, None)
        if known is not None and now - known.at < self.FORGOTTEN:
            known.strikes, known.at = known.strikes + 1, now
        else:
            known = _FailedUpload(1, now)
        clients[hello] = known
        while len(clients) > self._max_clients:
            del clients[next(iter(clients))]  # the one that failed least recently
        while len(self._failed) >= self._max_keys:
            del self._failed[next(iter(self._failed))]
        self._failed[key] = clients

    def succeeded(self, key: tuple[uuid.UUID, uuid.UUID], hello: bytes) -> None:
        """The client that said ``hello`` uploaded what it holds: it is not held again."""
        clients = self._failed.get(key)
        if clients is not None and clients.pop(hello, None) is not None and not clients:
            del self._failed[key]

    def hold_for(self, key: tuple[uuid.UUID, uuid.UUID], hello: bytes) -> float:
        """Seconds to hold a connection whose client said ``hello``: 0 unless the same
        client's last connections failed to upload what it holds (it offers it again)."""
        known = self._failed.get(key, {}).get(hello)
        if known is None or self._clock() - known.at >= self.FORGOTTEN:
            return 0.0
        return min(self.HOLD_MAX, 2.0 ** (known.strikes - 1))


@dataclass(slots=True)
class _Rate:
    """One user's document message budget (a token bucket) and how many sockets share it."""

    tokens: float
    at: float
    sockets: int = 0


class DocumentSessions:
    """Issues document tickets and serves document sockets for one process."""

    def __init__(
        self,
        *,
        db: Database,
        tickets: TicketCodec,
        documents: Documents,
        realtime: Realtime,
        settings: DocumentConnectionSettings,
        failures: ContainedFailures | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``clock`` (seconds) drives the users' update rates: the process's wall clock,
        as for its other rate limits (tests move it by hand)."""
        self.db = db
        self.tickets = tickets
        self.documents = documents
        self.realtime = realtime
        self.settings = settings
        self.failures = failures or realtime.failures
        self.metrics = metrics or realtime.metrics
        self._clock = clock
        self._rates: dict[uuid.UUID, _Rate] = {}
        self._open: dict[uuid.UUID, set[_DocumentConnection]] = {}  # by project
        self.failed_uploads = FailedUploads()

    async def issue_ticket(
        self, project_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID, path: str
    ) -> IssuedTicket:
        """A ticket for ``user_id`` (signed in with ``session_id``) to open the document at
        ``path`` in ``project_id``, which is found or created. Any member may have one.
        Raises NotAMember; DatabaseUnavailable."""
        if await projects.member_role(self.db, project_id, user_id) is None:
            raise NotAMember()
        try:
            ref = await self.documents.open(project_id, path, user_id)
        except DocumentNotFound:  # the project was deleted meanwhile
            raise NotAMember() from None
        ticket, _ = self.tickets.issue(
            user_id=user_id, session_id=session_id, project_id=project_id, document_id=ref.id
        )
        return IssuedTicket(ticket, ref.id.hex, self.tickets.ttl_seconds)

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Committed events of ``project_id``: close the sockets of a member removed
        (4005), of a member who became or stopped being a viewer (4014: the reconnect gets
        the new role), or all of a deleted project's (4006)."""
        connections = self._open.get(project_id)
        if not connections:
            return
        for event in events:
            if event.type is EventType.PROJECT_DELETED:
                for connection in list(connections):
                    connection.outbox.close(
                        CloseCode.PROJECT_DELETED, "project_deleted", flush=False
                    )
            elif event.type in (EventType.MEMBER_REMOVED, EventType.MEMBER_ROLE_CHANGED):
                user_id = str(event.payload.get("user_id"))
                editor = event.payload.get("role") != Role.VIEWER.value
                for connection in list(connections):
                    if str(connection.user_id) != user_id:
                        continue
                    if event.type is EventType.MEMBER_REMOVED:
                        connection.outbox.close(
                            CloseCode.MEMBER_REMOVED, "member_removed", flush=False
                        )
                    elif connection.peer is None or connection.peer.can_edit != editor:
                        connection.outbox.close(CloseCode.ROLE_CHANGED, "role_changed")

    async def serve(
        self, conn: BinaryConnection, handshake: DocumentHandshake, *, transport: str
    ) -> None:
        """Run one accepted document socket until it ends; closes it with a documented
        code. Its failure boundary: an unexpected exception ends this connection alone
        with 1011, logged once and counted in ``failures``. Never raises an Exception."""
        metrics = self.metrics
        gauge = metrics.ws_open_by_transport.get(transport) or metrics.ws_open.labels(transport)
        gauge.inc()
        connection = _DocumentConnection(self, conn, handshake)
        try:
            with log_context(connection_id=uuid.uuid4().hex[:16], transport=transport):
                try:
                    await connection.run()
                except* Exception as group:
                    self.failures.record("connection", group, connection.context(transport))
                    await connection.fail()
                log.debug("document connection ended")
        finally:
            gauge.dec()
            if not connection.closed:
                metrics.ws_closes.labels("peer").inc()

    # -- bookkeeping for connections ---------------------------------------------------------

    def _enter(self, connection: _DocumentConnection, project_id: uuid.UUID) -> None:
        self._open.setdefault(project_id, set()).add(connection)
        rate = self._rates.get(connection.user_id)
        if rate is None:
            if len(self._rates) >= _KEPT_RATES:
                self._forget_full_rates()
            burst = 2 * self.settings.updates_per_second
            rate = self._rates[connection.user_id] = _Rate(burst, self._clock())
        rate.sockets += 1

    def _leave(self, connection: _DocumentConnection, project_id: uuid.UUID) -> None:
        connections = self._open.get(project_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._open[project_id]
        rate = self._rates.get(connection.user_id)
        if rate is not None:
            rate.sockets -= 1
            # A bucket not yet refilled outlives the user's last socket, so that closing
            # (4010) and reconnecting does not refill it.
            if rate.sockets <= 0 and self._refilled(rate):
                del self._rates[connection.user_id]

    def _refilled(self, rate: _Rate) -> bool:
        per_second = self.settings.updates_per_second
        elapsed = max(0.0, self._clock() - rate.at)
        return rate.tokens + elapsed * per_second >= 2 * per_second

    def _forget_full_rates(self) -> None:
        for user_id, rate in list(self._rates.items()):
            if rate.sockets <= 0 and self._refilled(rate):
                del self._rates[user_id]

    def _allow(self, user_id: uuid.UUID) -> bool:
        """Spend one of the user's message tokens; False when they have none left."""
        rate = self._rates[user_id]
        now = self._clock()
        per_second = self.settings.updates_per_second
        # A wall clock set back refills nothing (and takes nothing away).
        elapsed = max(0.0, now - rate.at)
        rate.tokens = min(2 * per_second, rate.tokens + elapsed * per_second)
        rate.at = max(rate.at, now)
        if rate.tokens < 1:
            return False
        rate.tokens -= 1
        return True


class _DocumentConnection:
    """One WebSocket to one document: open (origin, ticket, session, membership, Attach),
    then a receive loop into the actor and a send task out of its ``Outbox``."""

    __slots__ = (
        "sessions",
        "conn",
        "handshake",
        "outbox",
        "ticket",
        "user_id",
        "actor",
        "peer",
        "_entered",
        "_sending",
        "closed",
        "_pending",
        "_hello",
        "_uploaded",
        "_holding",
    )

    def __init__(
        self, sessions: DocumentSessions, conn: BinaryConnection, handshake: DocumentHandshake
    ) -> None:
        self.sessions = sessions
        self.conn = conn
        self.handshake = handshake
        self.outbox: Outbox[bytes] = Outbox(sessions.settings.send_queue)
        self.ticket: Ticket | None = None
        self.user_id = uuid.UUID(int=0)
        self.actor: DocumentActor | None = None
        self.peer: Peer | None = None
        self._entered = False
        self._sending = trio.CancelScope()
        self.closed = False
        self.outbox.on_close = self._closing
        self._pending: list[str | bytes] = []  # read before attaching, handled first
        self._hello: bytes | None = None  # the client's first sync step 1
        self._uploaded = False  # a sync step 2 of the client's reached the document
        self._holding = trio.CancelScope()

    def context(self, transport: str) -> dict[str, object]:
        ticket = self.ticket
        return {
            "transport": transport,
            "room": self.handshake.room,
            "user_id": None if ticket is None else str(ticket.user_id),
        }

    async def run(self) -> None:
        index = self.sessions.realtime.connections
        try:
            try:
                await self._open()
            except _RefusedConnection as refusal:
                await self._close(refusal.code, refusal.reason)
                return
            except DatabaseUnavailable as error:
                log.warning("refused a document connection: %s", error)
                await self._close(CloseCode.TRY_AGAIN_LATER, "database_unavailable")
                return
            except ConnectionGone:
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, nursery.cancel_scope)
                nursery.start_soon(self._recheck_loop)
                await self._receive_loop(nursery.cancel_scope)
        finally:
            index.release(self.outbox)
            count_sent(self.outbox, self.sessions.metrics)
            if self._entered and self.ticket is not None:
                self.sessions._leave(self, self.ticket.project_id)
                self._note_failed_upload(self.ticket)
            await self._detach()

    async def fail(self) -> None:
        """End the connection after an unexpected exception: 1011, best effort."""
        try:
            await self._close(CloseCode.INTERNAL_ERROR, "internal_error")
        except Exception:
            log.debug("closing a failed document connection failed too", exc_info=True)

    async def _open(self) -> None:
        sessions, hs = self.sessions, self.handshake
        realtime = sessions.realtime
        origin = hs.headers.get("origin")
        if origin and not origin_allowed(origin, hs.headers.get("host"), realtime.allowed_origins):
            raise _RefusedConnection(CloseCode.FORBIDDEN, "origin_not_allowed")
        if not hs.ticket:
            raise _RefusedConnection(CloseCode.UNAUTHORIZED, "ticket_missing")
        try:
            ticket = sessions.tickets.verify(hs.ticket)
        except TokenError as error:
            raise _RefusedConnection(CloseCode.UNAUTHORIZED, error.code) from None
        if ticket.document_id.hex != hs.room:
            raise _RefusedConnection(CloseCode.FORBIDDEN, "ticket_not_for_this_document")
        self.ticket, self.user_id = ticket, ticket.user_id
        bind(user_id=str(ticket.user_id), project_id=str(ticket.project_id))
        # Indexed before the session is checked, so a logout committed after the check
        # still reaches this socket.
        if not realtime.connections.admit(
            self.outbox, ticket.user_id, ticket.session_id, trio.current_time()
        ):
            raise _RefusedConnection(CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections")
        user = await accounts.find_session_user(sessions.db, ticket.user_id, ticket.session_id)
        if user is None:
            raise _RefusedConnection(CloseCode.UNAUTHORIZED, "session_revoked")
        # Entered before the role is read, so a removal committed after the read still
        # reaches this socket (``DocumentSessions.publish``).
        sessions._enter(self, ticket.project_id)
        self._entered = True
        role = await projects.member_role(sessions.db, ticket.project_id, ticket.user_id)
        if role is None:
            raise _RefusedConnection(CloseCode.PROJECT_NOT_FOUND, "project_not_found")
        if sessions.failed_uploads:
            await self._hold_a_failed_upload(ticket)
        if self.outbox.closing:  # revoked, removed or shut down while it was checked or held
            raise _RefusedConnection(
                self.outbox.close_code or CloseCode.UNAUTHORIZED, self.outbox.close_reason
            )
        if isinstance(self.conn, DirectBinaryWrite):
            self.outbox.direct = self.conn.try_send_bytes
        self.peer = Peer(
            user_id=ticket.user_id,
            email=user.email,
            can_edit=role is not Role.VIEWER,
            deliver=self.outbox.put,  # a full outbox closes itself (4008)
            close=self._close_later,
        )
        try:
            self.actor = await sessions.documents.get(ticket.document_id)
            await self.actor.ask(Attach(self.peer), timeout=10.0)
        except DocumentNotFound:
            raise _RefusedConnection(CloseCode.PROJECT_NOT_FOUND, "document_not_found") from None
        except ActorStopped:
            self.actor = None
            raise _RefusedConnection(CloseCode.SERVICE_RESTART, "document_restarting") from None
        except AskTimeout:
            # The Attach may yet be handled: keep the actor, so the Detach follows it.
            raise _RefusedConnection(CloseCode.SERVICE_RESTART, "document_restarting") from None
        log.info("opened document %s as %s", ticket.document_id, Role(role).value)

    async def _hold_a_failed_upload(self, ticket: Ticket) -> None:
        """Read the client's first message (its sync step 1); if the same client's last
        connection failed to upload what it holds, hold this one open first (a provider
        resends a refused update on every reconnect, 0.1 s after each close)."""
        key, failed = (ticket.user_id, ticket.document_id), self.sessions.failed_uploads
        if key not in failed:
            return
        pending = self._pending
        with trio.move_on_after(_FIRST_MESSAGE_SECONDS):
            pending.append(await self.conn.receive())
        if not pending or not isinstance(pending[0], bytes):
            return
        hold = failed.hold_for(key, pending[0])
        if hold:
            log.info("holding a client that failed to upload for %.0f s", hold)
            # Until then (or until it is closed, or goes away): what it sends meanwhile
            # is kept, and handled in order once it is served (more than one message's
            # worth of bytes: served now).
            size, limit = len(pending[0]), self.sessions.settings.max_message_bytes
            with trio.move_on_after(hold) as self._holding:
                while len(pending) < _HELD_MESSAGES and size <= limit:
                    pending.append(message := await self.conn.receive())
                    size += len(message)

    def _note_failed_upload(self, ticket: Ticket) -> None:
        """At the end: did what the client holds fail to arrive? Refused as too large, or
        the socket went (cut by the transport for its size, say) before its sync step 2
        came; not when the server closed it for another reason (an outage, a restart)."""
        hello = self._hello
        if self.peer is None or hello is None or hello == _EMPTY_STEP1:
            return
        key = (ticket.user_id, ticket.document_id)
        outbox = self.outbox
        failed = self.sessions.failed_uploads
        if outbox.close_code in _REFUSED_UPLOADS or not (self._uploaded or outbox.closing):
            failed.failed(key, hello)
        elif self._uploaded and failed:
            failed.succeeded(key, hello)

    def _close_later(self, code: int, reason: str) -> None:
        self.outbox.close(code, reason)

    async def _send_loop(self, scope: trio.CancelScope) -> None:
        # Counted through ``Outbox.sent`` (direct writes add to it too): folded into the
        # metric before a scrape and when the connection ends.
        outbox = self.outbox
        if await drain_outbox(outbox, self._send_frames, self._flush, self._sending):
            assert outbox.close_code is not None
            await self._close(outbox.close_code, outbox.close_reason)
        scope.cancel()

    async def _send_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self.conn.send_bytes(frame)
        self.outbox.sent += len(frames)

    async def _flush(self) -> None:
        # Only a direct write leaves part of a frame owed.
        assert isinstance(self.conn, DirectBinaryWrite)
        await self.conn.flush()

    def _closing(self, flush: bool) -> None:
        self._holding.cancel()
        stop_sending(self._sending, flush)

    async def _receive_loop(self, scope: trio.CancelScope) -> None:
        sessions = self.sessions
        limit = sessions.settings.max_message_bytes
        count_in = sessions.metrics.ws_frames_in.inc
        actor, peer = self.actor, self.peer
        assert actor is not None and peer is not None
        receive = self.conn.receive
        pending = self._pending
        pending.reverse()
        try:
            while True:
                raw = pending.pop() if pending else await receive()
                count_in()
                if self.outbox.closing:
                    continue  # closing: nothing more it sends is acted on
                if isinstance(raw, str):
                    self.outbox.close(CloseCode.BAD_REQUEST, "binary_frames_only", flush=False)
                    continue
                if len(raw) > limit:
                    self.outbox.close(CloseCode.MESSAGE_TOO_BIG, "message_too_big", flush=False)
                    continue
                if not sessions._allow(peer.user_id):
                    # The client's provider reconnects and resyncs: nothing it typed is lost.
                    self.outbox.close(CloseCode.RATE_LIMITED, "rate_limited", flush=False)
                    continue
                if not self._uploaded:
                    if raw.startswith(_SYNC_STEP2):
                        self._uploaded = True
                    elif self._hello is None and raw.startswith(_SYNC_STEP1):
                        self._hello = raw
                try:
                    await actor.tell(Incoming(peer, raw))
                except ActorStopped:
                    self.outbox.close(CloseCode.SERVICE_RESTART, "document_restarted")
        except ConnectionGone:
            scope.cancel()

    async def _recheck_loop(self) -> None:
        # A task of its own, not a timeout around each receive: that cost a cancel scope
        # with a deadline per message.
        recheck = self.sessions.settings.recheck_seconds
        while True:
            await trio.sleep(recheck)
            await self._recheck()

    async def _recheck(self) -> None:
        """Is the user still signed in and a member with the same powers? A removal or a
        logout committed on another process reaches this socket here, at the latest."""
        ticket, peer, db = self.ticket, self.peer, self.sessions.db
        assert ticket is not None and peer is not None
        if self.outbox.closing:
            return
        try:
            if await accounts.find_session_user(db, ticket.user_id, ticket.session_id) is None:
                self.outbox.close(CloseCode.UNAUTHORIZED, "session_revoked", flush=False)
                return
            role = await projects.member_role(db, ticket.project_id, ticket.user_id)
        except DatabaseUnavailable:
            return  # weather: checked again next time
        if role is None:
            self.outbox.close(CloseCode.MEMBER_REMOVED, "member_removed", flush=False)
        elif (role is not Role.VIEWER) != peer.can_edit:
            self.outbox.close(CloseCode.ROLE_CHANGED, "role_changed")

    async def _close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            metrics = self.sessions.metrics
            metrics.ws_closes.labels(str(code)).inc()
            if code == CloseCode.SLOW_CONSUMER:
                metrics.ws_slow_consumers.inc()
        log.info("closing the document connection: %d %s", code, reason)
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self.conn.close(code, reason)

    async def _detach(self) -> None:
        if self.actor is None or self.peer is None:
            return
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                await self.actor.tell(Detach(self.peer))
            except ActorStopped:
                pass


def document_url(scheme: str, host: str) -> str:
    """The URL a ``WebsocketProvider`` is given for documents served at ``host``: ws for
    http, wss for https (the room follows it)."""
    return f"{'wss' if scheme == 'https' else 'ws'}://{host}{_DOCUMENTS_PATH.rstrip('/')}"
