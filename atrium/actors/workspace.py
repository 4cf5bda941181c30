"""The live workspace of one project: an actor owning presence, subscribers and delivery.

Every durable event (joins, leaves, file changes, and the project and membership events
written by the REST API) is in the project's event log before a client sees it, and every
connection receives the log's events in ``seq`` order with no gap and no duplicate: when
the actor is handed an event past the next expected ``seq`` (another writer committed in
between), it reads the missing ones from the log first; events it already delivered are
skipped. Cursor moves are ephemeral: broadcast, never stored.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import trio

from ..core.config import DEFAULTS
from ..core.events import Event, EventType, NewEvent
from ..core.roles import Action, Role, can
from ..core.timestamps import utc_now_iso
from ..persistence import events as store
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.errors import ProjectNotFound
from ..realtime import protocol
from ..realtime.outbox import Outbox
from ..realtime.presence import (
    Decision,
    LocalPresence,
    OnlineUser,
    PresenceBoard,
    Transition,
    online_json,
    presence_event,
)
from ..realtime.protocol import CloseCode, CursorUpdate, FileChange
from ..realtime.relay import NoRelay, Relay
from ._actor import Actor

log = logging.getLogger("atrium.workspace")

_connection_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class Subscriber:
    """One connection as the workspace sees it; the live connection owns the socket."""

    user_id: uuid.UUID
    email: str
    role: Role
    outbox: Outbox[str]
    id: int = field(default_factory=lambda: next(_connection_ids))


@dataclass(slots=True)
class Presence:
    connections: int
    last_seen: float  # trio clock


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """Subscribe; replies with the number of events replayed (resume)."""

    subscriber: Subscriber
    since_seq: int | None


@dataclass(frozen=True, slots=True)
class Leave:
    subscriber: Subscriber


@dataclass(frozen=True, slots=True)
class Edit:
    subscriber: Subscriber
    change: FileChange


@dataclass(frozen=True, slots=True)
class Cursor:
    subscriber: Subscriber
    cursor: CursorUpdate


@dataclass(frozen=True, slots=True)
class Published:
    """Events another writer (the REST API, another instance) committed to the log."""

    events: Sequence[Event]


@dataclass(frozen=True, slots=True)
class Behind:
    """Another process committed the project's log up to ``seq`` (its NOTIFY): deliver
    what this workspace has not seen yet, read from the log."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ephemeral:
    """An encoded frame for every connection that is never stored (a job's progress, or
    a cursor or progress relayed from another process); coalesced per ``key`` for a
    connection that falls behind, like cursors."""

    key: uuid.UUID
    frame: str


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Deliver whatever the log holds past what this workspace delivered: the relay
    between processes (re)connected, and it may have dropped events meanwhile."""


@dataclass(frozen=True, slots=True)
class Status:
    """Replies with the workspace's status (the seed's fields)."""


Message = Join | Leave | Edit | Cursor | Published | Behind | Ephemeral | CatchUp | Status


def _uncounted(_: int) -> None:
    pass


def _never() -> bool:
    return False


def _is_edit(message: Message) -> bool:
    return isinstance(message, Edit)


@dataclass(frozen=True, slots=True)
class WorkspaceSettings:
    resume_max_events: int = DEFAULTS.resume_max_events
    idle_timeout: float = DEFAULTS.workspace_idle_seconds
    mailbox_size: int = 4096
    # At most this many queued edits are stored in one transaction (services.py derives
    # it from WS_SEND_QUEUE; this is what the default queue gives).
    edit_batch: int = 64


class WorkspaceActor(Actor[Message, Any]):
    """The single owner of one project's live state.

    When the database is unavailable (a write or read raises DatabaseUnavailable) the
    workspace cannot keep its promise that every event is stored before it is seen: it
    closes every connection with 1013 (try again later) and stops normally, so an outage
    spends none of the supervisor's restart budget. Edits whose transaction failed were
    not ACKed; clients resend them with the same ``client_id`` once they are back, which
    stores each at most once. An asker (a Join) gets the DatabaseUnavailable.

    Who is online, and whether a connection is its user's first or last (USER_JOIN,
    USER_LEAVE), the ``presence`` board decides: this process alone (``LocalPresence``,
    the default) or every process sharing Redis (``ClusterPresence``).
    """

    expected_errors = (DatabaseUnavailable,)

    __slots__ = (
        "project_id",
        "_db",
        "_settings",
        "_subscribers",
        "_presence",
        "_last_seq",
        "_broadcasts",
        "_slow",
        "_count_deliveries",
        "_board",
        "_relay",
        "_count_gap_fills",
        "_notify_log",
    )

    def __init__(
        self,
        project_id: uuid.UUID,
        db: Database,
        settings: WorkspaceSettings,
        *,
        count_deliveries: Callable[[int], object] | None = None,
        relay: Relay | None = None,
        count_gap_fills: Callable[[int], object] | None = None,
        presence: PresenceBoard | None = None,
        notify_log: Callable[[], bool] | None = None,
    ) -> None:
        """``count_deliveries(n)`` is told how many connections each broadcast reached
        (a metric: once per broadcast, not per delivery). ``relay`` passes the events this
        workspace commits and the cursors it broadcasts on to other processes;
        ``count_gap_fills(n)`` is told how many events it read from the log because they
        had not reached it (a gap, a catch-up). ``presence`` is told of every connection
        that comes and goes."""
        super().__init__(
            name=f"workspace:{project_id}",
            mailbox_size=settings.mailbox_size,
            idle_timeout=settings.idle_timeout,
        )
        self.project_id = project_id
        self._db = db
        self._settings = settings
        self._subscribers: dict[int, Subscriber] = {}
        self._presence: dict[uuid.UUID, Presence] = {}
        self._last_seq = 0
        self._broadcasts = 0
        self._slow: list[Subscriber] = []  # closed as slow consumers, still to be dropped
        self._count_deliveries = count_deliveries or _uncounted
        self._board: PresenceBoard = presence or LocalPresence()
        self._relay = relay or NoRelay()
        self._count_gap_fills = count_gap_fills or _uncounted
        self._notify_log = notify_log or _never

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            # Whatever ended the actor (a crash, shutdown), its clients must not hang on a
            # workspace that no longer exists: they reconnect and resume from the log.
            for subscriber in self._subscribers.values():
                subscriber.outbox.close(CloseCode.SERVICE_RESTART, "workspace_restarted")
            self._board.vacate(self.project_id)

    async def on_start(self) -> None:
        self._last_seq = await store.last_seq(self._db, self.project_id)

    async def on_stop(self) -> None:
        # A graceful stop is the process shutting down (an idle stop has no subscribers).
        for subscriber in self._subscribers.values():
            subscriber.outbox.close(CloseCode.GOING_AWAY, "server_shutdown")

    def is_idle(self) -> bool:
        return not self._subscribers

    async def handle(self, message: Message) -> Any:
        try:
            return await self._handle(message)
        except DatabaseUnavailable:
            self._close_all(CloseCode.TRY_AGAIN_LATER, "database_unavailable")
            raise

    async def _handle(self, message: Message) -> Any:
        if isinstance(message, Cursor):
            return self._cursor(message)
        if isinstance(message, Edit):
            return await self._edits(message)
        if isinstance(message, Published):
            return await self._deliver(message.events)
        if isinstance(message, Behind):
            return await self._catch_up(message.seq)
        if isinstance(message, CatchUp):
            return await self._catch_up(await store.last_seq(self._db, self.project_id))
        if isinstance(message, Join):
            return await self._join(message)
        if isinstance(message, Leave):
            return await self._leave(message.subscriber)
        if isinstance(message, Status):
            return await self._status()
        if isinstance(message, Ephemeral):
            return self._ephemeral(message)
        raise TypeError(f"{self!r} does not handle {type(message).__name__}")

    # -- delivery ---------------------------------------------------------------------------

    def _broadcast(self, frame: str) -> None:
        self._broadcasts += 1
        self._count_deliveries(len(self._subscribers))
        for subscriber in self._subscribers.values():
            self._put(subscriber, frame)

    def _put(self, subscriber: Subscriber, frame: str) -> None:
        if not subscriber.outbox.put(frame):  # closed itself: a slow consumer (4008)
            self._slow.append(subscriber)

    async def _drop_slow(self) -> None:
        """Take connections closed as slow consumers out of presence now: a client that
        stopped reading can hold its transport (and its session) for a long while."""
        while self._slow:
            await self._leave(self._slow.pop())

    async def _deliver(self, events: Sequence[Event]) -> None:
        """Broadcast log events in ``seq`` order, filling gaps from the log."""
        for event in sorted(events, key=lambda e: e.seq):
            seq = event.seq
            if seq <= self._last_seq:
                continue  # already delivered (read from the log to fill a gap)
            if seq > self._last_seq + 1:
                missing = await store.events_between(
                    self._db, self.project_id, self._last_seq, seq - 1
                )
                self._count_gap_fills(len(missing))
                for earlier in missing:
                    self._deliver_one(earlier)
            self._deliver_one(event)
        await self._drop_slow()

    async def _catch_up(self, seq: int) -> None:
        if seq > self._last_seq:
            missed = await store.events_between(self._db, self.project_id, self._last_seq, seq)
            self._count_gap_fills(len(missed))
            await self._deliver(missed)

    def _deliver_one(self, event: Event) -> None:
        self._last_seq = event.seq
        self._broadcast(protocol.encode(protocol.event_frame(event)))
        self._apply(event)

    def _apply(self, event: Event) -> None:
        """Side effects of project events on the live connections."""
        kind, payload = event.type, event.payload
        if kind is EventType.PROJECT_DELETED:
            self._close_all(CloseCode.PROJECT_DELETED, "project_deleted")
        elif kind in (EventType.MEMBER_REMOVED, EventType.MEMBER_ROLE_CHANGED):
            user_id = uuid.UUID(str(payload.get("user_id")))
            for subscriber in [s for s in self._subscribers.values() if s.user_id == user_id]:
                if kind is EventType.MEMBER_REMOVED:
                    subscriber.outbox.close(CloseCode.MEMBER_REMOVED, "member_removed")
                    remaining = self._drop(subscriber)
                    if remaining is not None:
                        self._board.dropped(self.project_id, user_id, remaining)
                else:
                    subscriber.role = Role(str(payload.get("role")))

    # -- presence ---------------------------------------------------------------------------

    async def _join(self, message: Join) -> int:
        subscriber = message.subscriber
        outbox = subscriber.outbox
        outbox.put_unbounded(
            [
                protocol.encode(
                    {
                        "type": "PRESENCE_STATE",
                        "project_id": str(self.project_id),
                        "seq": self._last_seq,
                        "users": online_json(await self._online()),
                    }
                )
            ]
        )
        replayed = 0
        if message.since_seq is not None:
            replayed = await self._replay(subscriber, message.since_seq)
        self._subscribers[subscriber.id] = subscriber
        now = trio.current_time()
        presence = self._presence.get(subscriber.user_id)
        if presence is None:
            presence = self._presence[subscriber.user_id] = Presence(0, now)
        presence.connections += 1
        presence.last_seen = now
        await self._announce(
            subscriber,
            await self._board.joined(
                self.project_id, subscriber.user_id, subscriber.email, presence.connections
            ),
        )
        return replayed

    async def _replay(self, subscriber: Subscriber, since_seq: int) -> int:
        """Queue the events after ``since_seq``, then RESUMED; all of them or none.

        Not recovered (nothing replayed): more than ``resume_max_events`` missed, a seq
        ahead of the log, or a gap the log no longer holds. Retention deletes the oldest
        events of a project (a prefix of its seqs), so fewer rows than seqs missed means
        events after ``since_seq`` were pruned.
        """
        missed = self._last_seq - since_seq
        recovered = 0 <= missed <= self._settings.resume_max_events
        events: list[Event] = []
        if recovered and missed > 0:
            events = await store.events_between(
                self._db, self.project_id, since_seq, self._last_seq
            )
            if len(events) != missed:
                recovered, events = False, []
        frames = [protocol.encode(protocol.event_frame(e)) for e in events]
        frames.append(
            protocol.encode(
                {
                    "type": "RESUMED",
                    "since_seq": since_seq,
                    "seq": self._last_seq,
                    "recovered": recovered,
                    "replayed": len(events),
                }
            )
        )
        subscriber.outbox.put_unbounded(frames)
        return len(events)

    def _drop(self, subscriber: Subscriber) -> int | None:
        """Forget a connection; how many its user still holds here (None: it was not
        subscribed)."""
        if self._subscribers.pop(subscriber.id, None) is None:
            return None
        presence = self._presence.get(subscriber.user_id)
        if presence is None:
            return None
        presence.connections -= 1
        if presence.connections > 0:
            return presence.connections
        del self._presence[subscriber.user_id]
        return 0

    async def _leave(self, subscriber: Subscriber) -> None:
        remaining = self._drop(subscriber)
        if remaining is not None:
            await self._announce(
                subscriber,
                await self._board.left(
                    self.project_id, subscriber.user_id, subscriber.email, remaining
                ),
            )

    async def _announce(self, subscriber: Subscriber, decision: Decision) -> None:
        """Store and deliver the USER_JOIN or USER_LEAVE that ``decision`` calls for,
        unless the log already holds a later transition of the user (it is stale)."""
        transition = decision.transition
        if transition is Transition.NONE:
            return
        kind = EventType.USER_JOIN if transition is Transition.JOINED else EventType.USER_LEAVE
        event = presence_event(kind, subscriber.user_id, subscriber.email, decision.version)
        try:
            stored = await store.append_presence(
                self._db, self.project_id, [event], notify=self._notify_log()
            )
        except ProjectNotFound:
            self._close_all(CloseCode.PROJECT_DELETED, "project_deleted")
            return
        await self._publish(stored)

    async def _online(self) -> dict[uuid.UUID, OnlineUser]:
        """Everyone online in the project (on every process, with a cluster board)."""
        offset = time.time() - trio.current_time()  # trio's clock to wall clock
        here = {
            user_id: OnlineUser(p.connections, p.last_seen + offset)
            for user_id, p in self._presence.items()
        }
        return await self._board.online(self.project_id, here)

    def _touch(self, user_id: uuid.UUID) -> None:
        presence = self._presence.get(user_id)
        if presence is not None:
            presence.last_seen = trio.current_time()
            self._board.seen(self.project_id, user_id)

    # -- client events ----------------------------------------------------------------------

    async def _append(self, events: list[NewEvent]) -> list[store.Appended] | None:
        """Store events in one transaction and deliver the new ones; None when the project
        was deleted meanwhile (its workspace then closes)."""
        try:
            results = await store.append(
                self._db, self.project_id, events, notify=self._notify_log()
            )
        except ProjectNotFound:
            self._close_all(CloseCode.PROJECT_DELETED, "project_deleted")
            return None
        await self._publish([event for event, new in results if new])
        return results

    async def _publish(self, created: list[Event]) -> None:
        """Pass events this workspace committed on to the other processes, and deliver
        them here."""
        if created:
            self._relay.events(self.project_id, created)
            await self._deliver(created)

    def _close_all(self, code: CloseCode, reason: str) -> None:
        for subscriber in self._subscribers.values():
            subscriber.outbox.close(code, reason)
        self._subscribers.clear()
        self._presence.clear()
        self.request_stop()

    async def _edits(self, first: Edit) -> None:
        """Store the edits queued now (up to ``edit_batch``) in one transaction, then
        broadcast them and ACK each to its sender."""
        edits = [first]
        while len(edits) < self._settings.edit_batch:
            more = self.take_nowait(_is_edit)
            if not isinstance(more, Edit):
                break
            edits.append(more)
        accepted: list[Edit] = []
        for edit in edits:
            subscriber, change = edit.subscriber, edit.change
            if subscriber.id not in self._subscribers or subscriber.outbox.closing:
                continue  # gone or being closed (a revoked session's edits are not stored)
            if not can(subscriber.role, Action.EDIT_WORKSPACE):
                error = protocol.ProtocolError(
                    "forbidden_role", "Viewers cannot edit files", change.client_id
                )
                self._put(subscriber, error.frame())
                continue
            self._touch(subscriber.user_id)
            accepted.append(edit)
        if not accepted:
            await self._drop_slow()
            return
        results = await self._append(
            [
                NewEvent(
                    EventType.FILE_CHANGE,
                    e.subscriber.user_id,
                    {"file_path": e.change.file_path, "changes": e.change.changes},
                    e.change.client_id,
                )
                for e in accepted
            ]
        )
        for edit, (event, _) in zip(accepted, results or (), strict=False):
            if edit.change.client_id is not None:
                ack = {"type": "ACK", "id": edit.change.client_id, "seq": event.seq}
                self._put(edit.subscriber, protocol.encode(ack))
        await self._drop_slow()

    def _cursor(self, message: Cursor) -> None:
        subscriber, cursor = message.subscriber, message.cursor
        if subscriber.id not in self._subscribers:
            return
        self._touch(subscriber.user_id)
        self._broadcasts += 1
        frame = protocol.encode(
            {
                "type": "CURSOR_UPDATE",
                "user_id": str(subscriber.user_id),
                "position": {"file": cursor.file, "line": cursor.line, "column": cursor.column},
                "timestamp": utc_now_iso(),
            }
        )
        for other in self._subscribers.values():
            if other is not subscriber:
                other.outbox.put_cursor(subscriber.user_id, frame)
        self._count_deliveries(len(self._subscribers) - 1)
        self._relay.ephemeral(self.project_id, subscriber.user_id, frame)

    def _ephemeral(self, message: Ephemeral) -> None:
        self._broadcasts += 1
        frame = message.frame
        for subscriber in self._subscribers.values():
            subscriber.outbox.put_cursor(message.key, frame)
        self._count_deliveries(len(self._subscribers))

    def overview(self) -> dict[str, Any]:
        """Who is connected here now, for operators (JSON-ready): ``connections``,
        ``seq``, ``real_time_events`` and ``users`` (each with ``user_id``, ``email``,
        ``role`` and its ``connections`` to this process). Read from outside the actor's
        task like ``statistics()``: synchronous, so it never sees a change half done."""
        users: dict[uuid.UUID, dict[str, Any]] = {}
        for subscriber in self._subscribers.values():
            user = users.setdefault(
                subscriber.user_id,
                {
                    "user_id": str(subscriber.user_id),
                    "email": subscriber.email,
                    "role": str(subscriber.role),
                    "connections": 0,
                },
            )
            user["connections"] += 1
        return {
            "connections": len(self._subscribers),
            "seq": self._last_seq,
            "real_time_events": self._broadcasts,
            "users": list(users.values()),
        }

    async def _status(self) -> dict[str, Any]:
        online = await self._online()
        return {
            "project_id": str(self.project_id),
            "active_collaborators": len(online),
            "connections": sum(user.connections for user in online.values()),
            "online_users": online_json(online),
            "workspace_url": f"/ws/{self.project_id}",
            "real_time_events": self._broadcasts,
            "seq": self._last_seq,
        }


__all__ = [
    "Behind",
    "CatchUp",
    "Cursor",
    "Edit",
    "Ephemeral",
    "Join",
    "Leave",
    "Message",
    "Published",
    "Status",
    "Subscriber",
    "WorkspaceActor",
    "WorkspaceSettings",
]
