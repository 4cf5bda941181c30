"""Live workspace connections, written once over a small transport interface.

A transport adapter (the ASGI route on the main port, the wsproto listener on WS_PORT) accepts
the WebSocket, wraps it as a ``Connection`` and calls ``Realtime.serve``, which runs it as
a ``_LiveConnection``. Everything else —
origin check, authentication, membership, resume, heartbeats, token expiry, limits and
the per-connection send task — lives here and is the same for every transport.
"""

from __future__ import annotations

import contextvars
import heapq
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl

import trio

from ..actors import ActorStopped, AskTimeout
from ..actors.workspace import Cursor, Edit, Join, Leave, Subscriber, WorkspaceActor
from ..core.config import Settings
from ..core.failures import ContainedFailures
from ..core.logs import bind, log_context
from ..core.metrics import Metrics
from ..core.roles import Role
from ..core.timestamps import utc_iso_at, utc_now_iso
from ..identity.tokens import Claims, TokenCodec, TokenError
from ..persistence import accounts, projects
from ..persistence.database import Database, DatabaseUnavailable
from ..realtime import protocol
from ..realtime.connections import ConnectionIndex
from ..realtime.outbox import Outbox
from ..realtime.protocol import CloseCode, ProtocolError
from .workspaces import Workspaces

log = logging.getLogger("atrium.realtime")

_CLOSE_TIMEOUT = 2.0

FrameT = TypeVar("FrameT", str, bytes)


class ConnectionGone(Exception):
    """The peer went away (closed, reset, or the transport gave up)."""


class Connection(Protocol):
    """What a transport gives a live connection: text in, text out, close with a code."""

    async def receive(self) -> str | bytes:
        """The next message. Raises ConnectionGone."""
        ...

    async def send(self, text: str) -> None:
        """Send one text frame. Raises ConnectionGone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (best effort; never raises)."""
        ...

    async def flush(self) -> None:
        """Send what a direct write left unsent (see ``Outbox.direct``). Raises
        ConnectionGone."""
        ...


@runtime_checkable
class DirectWrite(Protocol):
    """A ``Connection`` that can also write without waiting: the session then lets its
    outbox hand frames straight to the socket while nothing is queued (``Outbox.direct``)."""

    def try_send(self, text: str) -> int:
        """Write one text frame now if the socket takes it without waiting: REFUSED
        (nothing written: queue it), SENT, or PARTIAL (the rest is owed: ``flush``).
        Never raises."""
        ...


# The request headers a live connection reads; only these are kept (lower-case names), as the
# rest would be held, decoded, for the life of every connection.
HANDSHAKE_HEADERS = frozenset({"origin", "host", "authorization"})


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the client asked for: the URL's parts and the request headers it needs
    (``HANDSHAKE_HEADERS``, lower-case)."""

    project_id: str
    path_user_id: str | None
    query: Mapping[str, str]
    headers: Mapping[str, str]

    @classmethod
    def parse(
        cls, path: str, query: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> Handshake | None:
        """The handshake of a request for ``/ws/{project_id}[/{user_id}]``, else None."""
        segments = path.strip("/").split("/")
        if len(segments) not in (2, 3) or segments[0] != "ws" or not all(segments):
            return None
        wanted = {
            name: value.decode("latin-1")
            for raw, value in headers
            if (name := raw.decode("latin-1").lower()) in HANDSHAKE_HEADERS
        }
        user_id = segments[2] if len(segments) == 3 else None
        return cls(segments[1], user_id, dict(parse_qsl(query)), wanted)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Timers and limits of each live connection: the WS_* settings (``of``), and a few
    fixed ones."""

    auth_timeout: float
    heartbeat_interval: float
    heartbeat_timeout: float
    send_queue: int
    rate_per_second: float
    rate_burst: int
    max_connections_per_user: int
    user_edits_per_second: float
    user_edit_burst: int
    rate_strikes: int = 20
    token_warning: float = 60.0
    token_grace: float = 30.0
    # WS_MAX_MESSAGE_BYTES: checked here, as the main port's transport allows a live
    # document's larger updates (DOC_MAX_UPDATE_BYTES) on every socket.
    max_message_bytes: int = 65_536

    @classmethod
    def of(cls, settings: Settings) -> ConnectionSettings:
        """The connection settings of a process's ``settings`` (``Settings()``: the
        defaults); bursts allow twice the per-second rate."""
        return cls(
            auth_timeout=settings.ws_auth_timeout_seconds,
            heartbeat_interval=settings.ws_heartbeat_interval_seconds,
            heartbeat_timeout=settings.ws_heartbeat_timeout_seconds,
            send_queue=settings.ws_send_queue,
            rate_per_second=settings.ws_rate_limit_per_second,
            rate_burst=2 * settings.ws_rate_limit_per_second,
            max_connections_per_user=settings.ws_max_connections_per_user,
            max_message_bytes=settings.ws_max_message_bytes,
            user_edits_per_second=settings.ws_user_edits_per_second,
            user_edit_burst=2 * settings.ws_user_edits_per_second,
        )


class Refused(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's ``Origin`` names the host it connected to: a page this server
    served (``/demo``), allowed without listing the server's own address in
    ALLOWED_ORIGINS. Only the host and port are compared: behind a TLS proxy the page is
    https while the proxied request is not."""
    _, sep, authority = origin.partition("://")
    if not sep or not host:
        return False
    return authority.rstrip("/").lower() == host.lower()


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser's ``Origin`` may open a live connection: listed in
    ALLOWED_ORIGINS (or ``*``), or the host it connected to (``_same_origin``)."""
    return "*" in allowed or origin.rstrip("/") in allowed or _same_origin(origin, host)


class Realtime:
    """Serves workspace connections for one process.

    ``connections`` indexes them by login session and by user (``ConnectionIndex``): it
    bounds each user's connections and edit rate, and ``revoke_session`` reaches a
    session's open sockets.
    """

    def __init__(
        self,
        *,
        db: Database,
        tokens: TokenCodec,
        workspaces: Workspaces,
        allowed_origins: tuple[str, ...],
        settings: ConnectionSettings,
        failures: ContainedFailures | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.tokens = tokens
        self.workspaces = workspaces
        self.allowed_origins = allowed_origins
        self.settings = settings
        self.connections = ConnectionIndex(
            max_per_user=settings.max_connections_per_user,
            edits_per_second=settings.user_edits_per_second,
            edit_burst=settings.user_edit_burst,
        )
        self.failures = failures or ContainedFailures()
        self.metrics = metrics or Metrics()
        self.timers = ConnectionTimers(self.failures)
        self.active = 0
        self._drained = trio.Event()
        self._drained.set()

    async def serve(self, conn: Connection, handshake: Handshake, *, transport: str) -> None:
        """Run one accepted connection until it ends; closes it with a documented code.

        This is the connection's failure boundary: an unexpected exception (a bug, a
        database error) ends this connection alone with 1011 ``internal_error``, is
        logged once with its context (``transport``, project, user) and counted in
        ``failures``; it never reaches the server that serves everyone else. Cancellation
        and other BaseExceptions propagate. Never raises an Exception.
        """
        if self.active == 0:
            self._drained = trio.Event()
        self.active += 1
        metrics = self.metrics
        gauge = metrics.ws_open_by_transport.get(transport) or metrics.ws_open.labels(transport)
        gauge.inc()
        connection = _LiveConnection(self, conn, handshake)
        # Not held for the connection's life (its headers hold the token): the connection
        # lets go of it once open.
        del handshake
        try:
            # Every line about this connection, from any of its tasks, carries these.
            with log_context(
                connection_id=uuid.uuid4().hex[:16],
                transport=transport,
                project_id=connection.project,
            ):
                try:
                    await connection.run()
                except* Exception as group:
                    self.failures.record("connection", group, connection.context(transport))
                    await connection.fail()
                log.debug("workspace connection ended")
        finally:
            gauge.dec()
            if not connection.closed:
                metrics.ws_closes.labels("peer").inc()
            self.active -= 1
            if self.active == 0:
                self._drained.set()

    async def wait_drained(self) -> None:
        """Return once no connection is being served."""
        await self._drained.wait()

    def count_sent_frames(self) -> None:
        """Add the frames sent since the last count (``Outbox.sent``) to the frames-out
        metric; run before a scrape (connections that end add their own)."""
        metrics = self.metrics
        for outbox in self.connections.outboxes():
            count_sent(outbox, metrics)

    def revoke_session(self, session_id: uuid.UUID) -> int:
        """Close this process's connections whose current token belongs to ``session_id``
        with 4001 ``session_revoked``, at once; returns how many. Call it after the
        revocation is committed (a connection that joins meanwhile is refused by the
        database check)."""
        return self.connections.revoke_session(session_id)


class ConnectionTimers:
    """Every live connection's next timer (heartbeat, token expiry), run by one task.

    A connection's timers fire every ``heartbeat_interval`` (25 s by default) whether or
    not anything else happens, so they are kept here rather than in the connection's own
    task: a timer that fires writes its PING straight to the socket (``Outbox.direct``)
    from this task, and the connection's task sleeps on its socket, untouched (no
    cancellation, no wake-up, no cancel scope per receive). The task is started when the
    first timer is set and ends when none is left; it is a system task (a connection has
    no nursery that outlives it, and the transports have different ones), so nothing may
    escape it: a timer that raises ends its connection with 1011, counted in
    ``failures``.
    """

    __slots__ = ("_heap", "_order", "_running", "_sleep", "_last", "_ping", "failures")

    # Between this many timers the task lets others run.
    _BATCH = 256
    # Passes start at most this often: timers that fall due meanwhile run together, at
    # most this late (connections that joined in a storm have their timers spread over
    # it; a pass per timer cost a cancelled sleep each).
    _GAP = 0.25

    def __init__(self, failures: ContainedFailures) -> None:
        # [when (trio clock), order, connection or None (cancelled)], a heap.
        self._heap: list[list[Any]] = []
        self._order = 0
        self._running = False
        self._sleep: trio.CancelScope | None = None
        self._last = -math.inf  # when the last pass started (trio clock)
        self._ping: str | None = None  # this pass's PING frame, made once
        self.failures = failures

    def set(self, connection: _LiveConnection, when: float) -> list[Any]:
        """Run ``connection.on_timer`` at ``when``; returns the entry to ``cancel``."""
        entry = [when, self._order, connection]
        self._order += 1
        heapq.heappush(self._heap, entry)
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(
                self._run, name="atrium.realtime.timers", context=contextvars.Context()
            )
        elif self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = max(when, self._last + self._GAP)
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = None  # popped in its time, never run

    def ping_frame(self) -> str:
        """The PING of the timers running now (one timestamp per pass)."""
        if self._ping is None:
            self._ping = protocol.encode({"type": "PING", "timestamp": utc_now_iso()})
        return self._ping

    async def _run(self) -> None:
        heap = self._heap
        try:
            while heap:
                now = trio.current_time()
                due = max(heap[0][0], self._last + self._GAP)
                if due > now:
                    with trio.CancelScope(deadline=due) as self._sleep:
                        await trio.sleep_forever()
                    self._sleep = None
                    continue
                self._last = now
                self._ping = None
                while heap and heap[0][0] <= now:
                    ran = 0
                    while heap and heap[0][0] <= now and ran < self._BATCH:
                        connection = heapq.heappop(heap)[2]
                        if connection is not None:
                            ran += 1
                            self._fire(connection, now)
                    await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            self._sleep = None

    def _fire(self, connection: _LiveConnection, now: float) -> None:
        try:
            connection.on_timer(now)
        except Exception as error:
            self.failures.record("connection", error, connection.context("timer"))
            connection.outbox.close(CloseCode.INTERNAL_ERROR, "internal_error", flush=False)


class _LiveConnection:
    """One WebSocket connection to a workspace: open (origin, token, membership, Join),
    then a receive loop; frames go out straight from the workspace's task when the
    transport can write without waiting (``DirectWrite``), else through a send task that
    drains the ``Outbox``, started when something is queued. Its timers run in
    ``ConnectionTimers``."""

    # Slots: an idle connection's memory is mostly its task and these objects.
    __slots__ = (
        "rt",
        "settings",
        "conn",
        "handshake",
        "project",
        "outbox",
        "claims",
        "expires_at",
        "last_activity",
        "rate_allowance",
        "rate_at",
        "strikes",
        "actor",
        "subscriber",
        "batch",
        "_nursery",
        "_sender",
        "_sending",
        "_close_deadline",
        "_timer",
        "_next_ping",
        "_warned_for",
        "closed",
    )

    def __init__(self, realtime: Realtime, conn: Connection, handshake: Handshake) -> None:
        self.rt = realtime
        self.settings = realtime.settings
        self.conn = conn
        self.handshake: Handshake | None = handshake  # until open
        self.project = handshake.project_id[:64]
        self.outbox: Outbox[str] = Outbox(realtime.settings.send_queue)
        self.claims: Claims | None = None
        self.expires_at = 0.0  # trio clock
        self.last_activity = trio.current_time()
        # The message rate limit, a token bucket: messages allowed now, refilled since.
        self.rate_allowance = float(realtime.settings.rate_burst)
        self.rate_at = trio.current_time()
        self.strikes = 0
        self.actor: WorkspaceActor | None = None
        self.subscriber: Subscriber | None = None
        self.batch = False
        self._nursery: trio.Nursery | None = None  # while the connection is open
        self._sender = False  # a send task runs
        self._sending: trio.CancelScope | None = None  # its scope, while it sends
        self._close_deadline = math.inf  # when a close stops sending (trio clock)
        self._timer: list[Any] | None = None  # in ConnectionTimers
        self._next_ping = 0.0  # trio clock
        self._warned_for: float | None = None  # the expiry a TOKEN_EXPIRING was sent for
        self.closed = False  # a close frame was sent (else the peer ended it: metrics)
        self.outbox.on_close = self._closing
        self.outbox.on_ready = self._start_sender

    async def run(self) -> None:
        try:
            try:
                await self._open()
            except Refused as refusal:
                await self._close(refusal.code, refusal.reason)
                return
            except DatabaseUnavailable as error:
                log.warning("refused a workspace connection: %s", error)
                await self._close(CloseCode.TRY_AGAIN_LATER, "database_unavailable")
                return
            except ConnectionGone:
                return
            # This task receives; a send task runs while frames wait for the socket.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if len(self.outbox) or self.outbox.owed or self.outbox.closing:
                        self._start_sender()  # the Join's PRESENCE_STATE, or a close
                    self._next_ping = trio.current_time() + self.settings.heartbeat_interval
                    self._set_timer()
                    await self._receive_loop(nursery.cancel_scope)
                finally:
                    # The nursery takes no new task once this block ends (it waits for a
                    # send task there): a frame the workspace queues meanwhile (a
                    # broadcast) must not try to start one.
                    self._nursery = None
        finally:
            self._nursery = None
            if self._timer is not None:
                ConnectionTimers.cancel(self._timer)
                self._timer = None
            # Out of the index before the Leave: once others see this user leave, the
            # user's connection count here already dropped.
            self.rt.connections.release(self.outbox)
            count_sent(self.outbox, self.rt.metrics)
            await self._leave()

    def context(self, transport: str) -> dict[str, object]:
        """Who and where, for the log line of a contained failure."""
        claims = self.claims
        return {
            "transport": transport,
            "project_id": self.project,
            "user_id": None if claims is None else str(claims.user_id),
        }

    async def fail(self) -> None:
        """End the connection after an unexpected exception: 1011, best effort."""
        try:
            await self._close(CloseCode.INTERNAL_ERROR, "internal_error")
        except Exception:  # the transport broke with it: nothing more can be sent
            log.debug("closing a failed connection failed too", exc_info=True)

    # -- opening ----------------------------------------------------------------------------

    async def _open(self) -> None:
        hs = self.handshake
        assert hs is not None
        self.handshake = None  # its headers (the token) are not kept
        origin = hs.headers.get("origin")
        if origin and not origin_allowed(origin, hs.headers.get("host"), self.rt.allowed_origins):
            raise Refused(CloseCode.FORBIDDEN, "origin_not_allowed")
        try:
            project_id = uuid.UUID(hs.project_id)
        except ValueError:
            raise Refused(CloseCode.PROJECT_NOT_FOUND, "project_not_found") from None
        since_seq = self._since_seq(hs.query.get("since_seq"))
        batch = hs.query.get("batch", "").lower() in ("1", "true", "yes")

        header = hs.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            claims = self._verify(token.strip())
        else:
            auth = await self._first_auth_frame()
            claims = self._verify(auth.token)
            if auth.since_seq is not None:
                since_seq = auth.since_seq
        bind(user_id=str(claims.user_id))
        if hs.path_user_id is not None and hs.path_user_id != str(claims.user_id):
            raise Refused(CloseCode.FORBIDDEN, "user_mismatch")
        # Indexed before the login session is checked, so a revocation committed after the
        # check still reaches this connection.
        admitted = self.rt.connections.admit(
            self.outbox, claims.user_id, claims.session_id, trio.current_time()
        )
        if not admitted:
            raise Refused(CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections")
        live, role = await projects.session_member_role(
            self.rt.db, project_id, claims.user_id, claims.session_id
        )
        if not live:
            raise Refused(CloseCode.UNAUTHORIZED, "session_revoked")
        if role is None:
            raise Refused(CloseCode.PROJECT_NOT_FOUND, "project_not_found")
        self._accept_token(claims)
        self.batch = batch
        if isinstance(self.conn, DirectWrite) and not batch:
            self.outbox.direct = self.conn.try_send
        self.subscriber = Subscriber(claims.user_id, claims.email, Role(role), self.outbox)
        if self.outbox.closing:  # revoked while it was being checked
            raise Refused(CloseCode.UNAUTHORIZED, "session_revoked")
        try:
            self.actor = await self.rt.workspaces.get(project_id)
            replayed = await self.actor.ask(Join(self.subscriber, since_seq), timeout=10.0)
            log.info("joined the workspace as %s", Role(role).value)
        except ActorStopped:
            self.actor = None
            raise Refused(CloseCode.SERVICE_RESTART, "workspace_restarting") from None
        except AskTimeout:
            # The Join is still in the mailbox and may yet be handled: keep the actor, so
            # the Leave that follows it in the mailbox takes the connection out again.
            raise Refused(CloseCode.SERVICE_RESTART, "workspace_restarting") from None
        if since_seq is not None:
            self.rt.metrics.ws_resumes.inc()
            self.rt.metrics.ws_replayed.inc(replayed)

    def _since_seq(self, raw: str | None) -> int | None:
        if raw is None or raw == "":
            return None
        value = protocol.non_negative_int(raw)
        if value is None:
            raise Refused(CloseCode.BAD_REQUEST, "invalid_since_seq")
        return value

    async def _first_auth_frame(self) -> protocol.Auth:
        with trio.move_on_after(self.settings.auth_timeout):
            raw = await self.conn.receive()
            if len(raw) > self.settings.max_message_bytes:
                raise Refused(CloseCode.MESSAGE_TOO_BIG, "message_too_big")
            message = protocol.parse_client_frame(raw)
            if isinstance(message, protocol.Auth):
                return message
            raise Refused(CloseCode.UNAUTHORIZED, "auth_required")
        raise Refused(CloseCode.AUTH_TIMEOUT, "auth_timeout")

    def _verify(self, token: str) -> Claims:
        try:
            return self.rt.tokens.verify(token, expected="access")
        except TokenError as error:
            raise Refused(CloseCode.UNAUTHORIZED, error.code) from None

    def _accept_token(self, claims: Claims) -> None:
        self.rt.connections.renew(self.outbox, claims.session_id)
        self.claims = claims
        self.expires_at = trio.current_time() + (claims.expires_at - time.time())
        if self._timer is not None:  # open: the token's timer moves
            self._set_timer()

    # -- running ----------------------------------------------------------------------------

    def _start_sender(self) -> None:
        """Start the send task, unless it runs (or the connection is not open yet: it
        starts then if frames wait)."""
        if not self._sender and self._nursery is not None:
            self._sender = True
            self._nursery.start_soon(self._send_loop)

    async def _send_loop(self) -> None:
        """Send what is queued or owed, then end (a transport that writes directly) or
        wait for more (one that does not); close the connection once a close is asked
        for, after the queued frames unless it said not to wait for them."""
        outbox, conn, nursery = self.outbox, self.conn, self._nursery
        assert nursery is not None
        scope = self._sending = trio.CancelScope()
        if outbox.closing:
            scope.deadline = self._close_deadline
        try:
            with scope:
                while True:
                    if outbox.owed:
                        outbox.owed = False
                        await conn.flush()
                    frames = outbox.take()
                    if frames:
                        if self.batch:
                            await conn.send("[" + ",".join(frames) + "]")
                            outbox.sent += 1
                        else:
                            for frame in frames:
                                await conn.send(frame)
                            del frame
                            outbox.sent += len(frames)
                        del frames  # not held while the connection idles
                    elif outbox.owed:
                        continue
                    elif outbox.closing:
                        break
                    elif outbox.direct is not None:
                        # Idle: the task ends; the next frame that must wait starts one.
                        self._sending = None
                        self._sender = False
                        return
                    else:
                        await outbox.wait()
        except ConnectionGone:
            nursery.cancel_scope.cancel()
            return
        assert outbox.close_code is not None
        await self._close(outbox.close_code, outbox.close_reason)
        nursery.cancel_scope.cancel()

    def _closing(self, flush: bool) -> None:
        # A blocked send (a client that stopped reading) must not hold up a close: stop
        # sending at once when nothing is to be flushed, else after a short grace.
        self._close_deadline = trio.current_time() + _CLOSE_TIMEOUT if flush else -math.inf
        if self._sending is not None:
            self._sending.deadline = min(self._sending.deadline, self._close_deadline)

    async def _close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            metrics = self.rt.metrics
            metrics.ws_closes.labels(str(code)).inc()
            if code == CloseCode.SLOW_CONSUMER:
                metrics.ws_slow_consumers.inc()
        log.info("closing the connection: %d %s", code, reason)
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self.conn.close(code, reason)

    async def _receive_loop(self, scope: trio.CancelScope) -> None:
        """Receive frames and act on them until the connection ends. Timers run in
        ``ConnectionTimers``: this task wakes for frames alone."""
        receive = self.conn.receive
        count_in = self.rt.metrics.ws_frames_in.inc
        try:
            while True:
                raw = await receive()
                self.last_activity = trio.current_time()
                count_in()
                await self._on_frame(raw)
                del raw  # not held while the connection idles
        except ConnectionGone:
            scope.cancel()

    async def _on_frame(self, raw: str | bytes) -> None:
        if self.outbox.closing:
            return  # closing (revoked, removed, too slow, ...): nothing more is acted on
        if len(raw) > self.settings.max_message_bytes:
            self.outbox.close(CloseCode.MESSAGE_TOO_BIG, "message_too_big", flush=False)
            return
        if not self._within_rate():
            return
        message = protocol.parse_client_frame(raw)
        if isinstance(message, ProtocolError):
            self._reply(message.frame())
            return
        actor, subscriber = self.actor, self.subscriber
        assert actor is not None and subscriber is not None
        try:
            if isinstance(message, protocol.CursorUpdate):
                await actor.tell(Cursor(subscriber, message))
            elif isinstance(message, protocol.FileChange):
                if self.rt.connections.allow_edit(subscriber.user_id, trio.current_time()):
                    await actor.tell(Edit(subscriber, message))
                else:
                    self._reply(
                        ProtocolError(
                            "rate_limited",
                            "Too many edits from this user's connections; slow down",
                            message.client_id,
                        ).frame()
                    )
            elif isinstance(message, protocol.Ping):
                self._reply(protocol.encode({"type": "PONG"}))
            elif isinstance(message, protocol.Auth):
                await self._reauthenticate(message)
        except ActorStopped:
            self.outbox.close(CloseCode.SERVICE_RESTART, "workspace_restarted")
        except DatabaseUnavailable:
            self.outbox.close(CloseCode.TRY_AGAIN_LATER, "database_unavailable")

    def _reply(self, frame: str) -> None:
        self.outbox.put(frame)  # a full outbox closes itself (4008)

    def _within_rate(self) -> bool:
        now = trio.current_time()
        rate, burst = self.settings.rate_per_second, self.settings.rate_burst
        self.rate_allowance = min(burst, self.rate_allowance + (now - self.rate_at) * rate)
        self.rate_at = now
        if self.rate_allowance >= 1:
            self.rate_allowance -= 1
            self.strikes = 0
            return True
        self.strikes += 1
        if self.strikes >= self.settings.rate_strikes:
            self.outbox.close(CloseCode.RATE_LIMITED, "rate_limited", flush=False)
        else:
            self._reply(ProtocolError("rate_limited", "Too many messages; slow down").frame())
        return False

    async def _reauthenticate(self, auth: protocol.Auth) -> None:
        assert self.claims is not None
        try:
            claims = self.rt.tokens.verify(auth.token, expected="access")
        except TokenError as error:
            self._reply(ProtocolError(error.code, error.message).frame())
            return
        if claims.user_id != self.claims.user_id:
            self._reply(ProtocolError("user_mismatch", "The token is for another user").frame())
            return
        if await accounts.find_session_user(self.rt.db, claims.user_id, claims.session_id) is None:
            self._reply(ProtocolError("session_revoked", "This session has ended").frame())
            return
        self._accept_token(claims)
        self._reply(
            protocol.encode(
                {
                    "type": "AUTH_OK",
                    "user_id": str(claims.user_id),
                    "expires_at": utc_iso_at(claims.expires_at),
                }
            )
        )

    def _set_timer(self) -> None:
        """(Re)set this connection's timer to ``_timer_deadline``."""
        timers = self.rt.timers
        if self._timer is not None:
            timers.cancel(self._timer)
            self._timer = None
        when = self._timer_deadline()
        if when != math.inf:
            self._timer = timers.set(self, when)

    def on_timer(self, now: float) -> None:
        """Called by ``ConnectionTimers`` when the timer is due."""
        self._timer = None
        self._on_timer(now)
        self._set_timer()

    def _timer_deadline(self) -> float:
        """When ``_on_timer`` is next due (trio clock)."""
        if self.outbox.closing:
            return math.inf
        if self._warned_for == self.expires_at:
            token_at = self.expires_at + self.settings.token_grace
        else:
            token_at = self.expires_at - self.settings.token_warning
        return min(self._next_ping, token_at)

    def _on_timer(self, now: float) -> None:
        """Heartbeats and token expiry.

        Every ``heartbeat_interval`` a PING goes out, unless the client has been silent for
        ``heartbeat_timeout`` (then 4009). ``token_warning`` seconds before the access
        token expires a TOKEN_EXPIRING goes out; without a fresh token (an AUTH frame moves
        ``expires_at``) by expiry plus ``token_grace``, the connection closes with 4007.
        """
        settings = self.settings
        if now >= self._next_ping:
            if now - self.last_activity >= settings.heartbeat_timeout:
                self.outbox.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat_timeout", flush=False)
                return
            self._reply(self.rt.timers.ping_frame())
            self._next_ping = now + settings.heartbeat_interval
        if self._warned_for == self.expires_at:
            if now >= self.expires_at + settings.token_grace:
                self.outbox.close(CloseCode.TOKEN_EXPIRED, "token_expired")
        elif now >= self.expires_at - settings.token_warning:
            assert self.claims is not None
            self._warned_for = self.expires_at
            self._reply(
                protocol.encode(
                    {
                        "type": "TOKEN_EXPIRING",
                        "expires_at": utc_iso_at(self.claims.expires_at),
                        "reauth_within_seconds": settings.token_warning + settings.token_grace,
                    }
                )
            )

    async def _leave(self) -> None:
        if self.actor is None or self.subscriber is None:
            return
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                await self.actor.tell(Leave(self.subscriber))
            except ActorStopped:
                pass


async def drain_outbox(
    outbox: Outbox[FrameT],
    send: Callable[[list[FrameT]], Awaitable[None]],
    flush: Callable[[], Awaitable[None]],
    sending: trio.CancelScope,
) -> bool:
    """A connection's send task: hand what ``outbox`` queues to ``send`` (the frames
    taken at once; it adds what it sent to ``outbox.sent``), and first to ``flush`` what a
    direct write left owed, until a close is requested and nothing is left to send.
    True then (the caller closes with ``outbox.close_code``), and also when ``sending``
    was cancelled (``stop_sending``); False when the connection went away."""
    try:
        with sending:
            while True:
                await outbox.wait()
                if outbox.owed:
                    outbox.owed = False
                    await flush()
                frames = outbox.take()
                if frames:
                    await send(frames)
                    del frames  # not held while the connection idles
                elif outbox.closing and not outbox.owed:
                    break
    except ConnectionGone:
        return False
    return True


def stop_sending(sending: trio.CancelScope, flush: bool) -> None:
    """An outbox's ``on_close`` for ``drain_outbox``: a blocked send (a client that
    stopped reading) must not hold up a close, so stop sending at once when nothing is to
    be flushed, else after a short grace."""
    if flush:
        sending.deadline = min(sending.deadline, trio.current_time() + _CLOSE_TIMEOUT)
    else:
        sending.cancel()


def count_sent(outbox: Outbox[Any], metrics: Metrics) -> None:
    """Add the frames ``outbox`` sent since its last count to the frames-out metric."""
    sent = outbox.sent
    if sent != outbox.counted:
        metrics.ws_frames_out.inc(sent - outbox.counted)
        outbox.counted = sent
