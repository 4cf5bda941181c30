"""The bridge between processes: live workspace traffic over Redis pub/sub.

Every process that serves workspaces with REDIS_URL set runs one ``Bridge``. It is the
process's ``Relay``: what a workspace commits (durable events) or sends (cursor moves, job
progress) here is published to the channel of the project and this process,
``atrium:ws:<instance id>:<project id>``, serialised once per message whatever the number
of receivers. Its subscriber receives the other processes' messages and hands them to the
project's ``WorkspaceActor`` if it is open here: events as ``Published`` (the actor orders
them by ``seq``, fills gaps from the log and skips what it has delivered), ephemeral frames
as ``Ephemeral`` (already encoded).

Pattern subscriptions that match every process's channels but this one's, rather than one
subscription per open workspace: nothing to do when a workspace starts or stops (they come
and go with idle timeouts), no window between a workspace starting and its subscription
taking effect, and one command to re-subscribe after a reconnect. The price is that each
process also receives the traffic of projects it does not serve; it drops those by the
channel name, before decoding anything. For a handful of processes serving overlapping
projects (the case here) that is cheaper than subscription churn; many processes with
disjoint projects would want per-project subscriptions.

Redis sends a message to every subscription that matches, the publisher's own included, and
parsing one costs redis-py about as much as publishing it. So the patterns leave out this
process's own channels: for instance id ``c0 c1 ... cn``, one pattern per position,
``atrium:ws:[^c0]*``, ``atrium:ws:c0[^c1]*``, ... A channel of another process matches
exactly one of them (the one where the two ids first differ), and one of this process's
none: Redis never sends a process its own messages back.

Cursor moves and job progress (lossy by design: the next one replaces a lost one) are
published without waiting for Redis's answer, durable events and catch-up notices with it
(see ``atrium.seams.redis_wire.publish_all``).

Pub/sub is at-most-once: messages published while a subscriber is disconnected are lost,
and so are those this process could not publish. So after every (re)subscription each
open workspace catches up from the log (``CatchUp``); events this process could not
publish are announced, once Redis takes messages again, as one "the log reached seq N"
message per project, on which the others read them from the log (``Behind``); and a gap
seen later is filled from the log by the actor itself. Clients see every event once, in
``seq`` order, across a Redis restart. While Redis is away (the
breaker open) the bridge drops what it would publish and subscribes again as soon as a
probe closes the breaker (a failure with the breaker closed is retried after 0.1 s,
doubling to 1 s): the process serves its own clients, the
durable events committed here are announced on the log (PostgreSQL NOTIFY, see
``domain.workspaces.Workspaces``) and so reach the other processes' workspaces at once,
its open workspaces also poll the log every second (in case a notification was lost),
and cursors and job progress from other processes do not arrive until Redis is back. A
workspace whose mailbox was too full to take a received event catches up the same way.

Live documents cross on the same channels, named by the document's id instead of the
project's: each update stored here with its seq (``Replicated`` for the document's actor
elsewhere, which applies updates in seq order and reads a gap from PostgreSQL), each
awareness change (lossy, like a cursor), and "the document reached seq N" for updates
that could not be relayed (``Reached``). Every (re)subscription, and every poll while
degraded, makes each open document read what it lacks (``Reached(None)``).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import orjson
import trio

from ..core.breaker import BreakerState
from ..core.events import Event, EventType
from ..core.json_output import dumps
from ..core.metrics import Metrics
from ..persistence.redis import Redis, RedisUnavailable
from ..seams.redis_wire import Publish, publish_all, replies_can_be_skipped
from ._errors import ActorStopped, MailboxFull
from .document import DocumentActor, Reached, RemoteAwareness, Replicated
from .workspace import Behind, CatchUp, Ephemeral, Published, WorkspaceActor

log = logging.getLogger("atrium.bridge")

CHANNEL_PREFIX = "atrium:ws:"
_EVENTS = b"e"
_EPHEMERAL = b"p"
_LOGGED = b"s"  # "the project's log reached seq N": events this process could not relay
_DOC_UPDATE = b"u"  # one stored Yjs update; the key is its seq
_DOC_AWARENESS = b"w"
_DOC_REACHED = b"r"  # "the document reached seq N": updates this process could not relay
_KINDS = {
    _EVENTS: "events",
    _EPHEMERAL: "ephemeral",
    _LOGGED: "catch_up",
    _DOC_UPDATE: "document_updates",
    _DOC_AWARENESS: "document_awareness",
    _DOC_REACHED: "document_catch_up",
}
_DOCUMENT_KINDS = (_DOC_UPDATE, _DOC_AWARENESS, _DOC_REACHED)
_BATCH = 512  # messages published in one write at most
_RETRY_FIRST = 0.1
_RETRY_MAX = 1.0  # as the breaker's probes: back within a second of Redis answering
# The subscription is PINGed this often; no answer for twice as long counts as lost (a
# frozen or silently unreachable Redis), so the process degrades within 2-3 s.
PING_SECONDS = 1.0
# How often the publisher retries telling others about events it could not relay.
_UNSENT_RETRY_SECONDS = 0.5
# While degraded, open workspaces poll the log this often (the default): other processes'
# durable events still arrive, late, should their NOTIFY on the log not reach this one.
DEGRADED_POLL_SECONDS = 1.0

# (project or document id, kind, key, body); a document update's key is its seq.
_Outgoing = tuple[uuid.UUID, bytes, uuid.UUID | int | None, Sequence[Event] | str | bytes]


class LocalWorkspaces(Protocol):
    """The workspaces open in this process (``domain.workspaces.Workspaces``)."""

    def find(self, project_id: uuid.UUID) -> WorkspaceActor | None: ...

    def running(self) -> list[WorkspaceActor]: ...


class LocalDocuments(Protocol):
    """The live documents open in this process (``domain.documents.Documents``)."""

    def find(self, document_id: uuid.UUID) -> DocumentActor | None: ...

    def running(self) -> list[DocumentActor]: ...


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    mailbox_depth: int
    """Messages waiting to be published."""


def channel_of(instance: str, project_id: uuid.UUID) -> str:
    """The pub/sub channel of ``project_id``'s messages published by ``instance``."""
    return f"{CHANNEL_PREFIX}{instance}:{project_id}"


def patterns_of(instance: str) -> list[str]:
    """Patterns that match the channels of every instance but ``instance`` (a channel
    matches one of them at most, so no message arrives twice)."""
    return [f"{CHANNEL_PREFIX}{instance[:i]}[^{char}]*" for i, char in enumerate(instance)]


def _event_to_wire(event: Event) -> dict[str, Any]:
    return {
        "s": event.seq,
        "t": event.type,
        "a": event.actor_id,
        "d": event.payload,
        "c": event.created_at,
    }


def _event_from_wire(project_id: uuid.UUID, item: dict[str, Any]) -> Event:
    actor = item["a"]
    return Event(
        project_id=project_id,
        seq=int(item["s"]),
        type=EventType(item["t"]),
        actor_id=None if actor is None else uuid.UUID(actor),
        payload=dict(item["d"]),
        created_at=datetime.fromisoformat(item["c"]),
    )


class Bridge:
    """The process's relay to and from Redis (see the module docstring).

    The object lives as long as the process (workspaces hold it as their ``Relay``); its
    ``run`` is the supervised ``bridge`` child, restarted on its own faults. What is
    relayed while ``run`` is not running, or while Redis is away, is dropped (counted).
    ``instance`` names the process in its channels: hex digits, the same length on every
    process (16 random ones unless given).
    """

    def __init__(
        self,
        redis: Redis,
        metrics: Metrics,
        *,
        queue_size: int = 8192,
        ping_seconds: float = PING_SECONDS,
        instance: str | None = None,
        poll_seconds: float = DEGRADED_POLL_SECONDS,
    ) -> None:
        """``poll_seconds``: how often, while degraded, the open workspaces read the log."""
        self.redis = redis
        # 64 random bits unless given: one pattern per hex digit (see patterns_of).
        self.instance = secrets.token_hex(8) if instance is None else instance
        self._own = self.instance.encode() + b"|"
        self._metrics = metrics
        self._ping_seconds = ping_seconds
        self._poll_seconds = poll_seconds
        self._send, self._receive = trio.open_memory_channel[_Outgoing](queue_size)
        self._running = False
        self._listening = False
        self._connected = False
        self._changed = trio.Event()  # set (and replaced) when ``connected`` changes
        # Projects (kind _LOGGED) and documents (_DOC_REACHED) whose events or updates
        # were not relayed, and the highest seq among them.
        self._unsent: dict[tuple[uuid.UUID, bytes], int] = {}
        # Open projects whose workspace could not take a received event (a full mailbox),
        # and open documents whose actor could not take a received update.
        self._missed: set[uuid.UUID] = set()
        self._missed_documents: set[uuid.UUID] = set()
        self._published = {kind: metrics.bridge_published.labels(kind) for kind in _KINDS.values()}
        self._received = {code: metrics.bridge_received.labels(k) for code, k in _KINDS.items()}
        self._dropped_unavailable = metrics.bridge_dropped.labels("unavailable")
        self._dropped_full = metrics.bridge_dropped.labels("queue_full")
        self._invalid = metrics.bridge_dropped.labels("invalid")
        # Whether Redis lets this process skip replies (``CLIENT REPLY SKIP``; a managed
        # Redis or an ACL may refuse CLIENT commands): asked before the first publish.
        self._skip_replies: bool | None = None
        for state in BreakerState:
            metrics.redis_breaker.labels(str(state)).set_function(partial(_is_state, redis, state))
        metrics.bridge_connected.set_function(lambda: 1.0 if self.connected else 0.0)

    # -- the Relay: called by workspaces, never blocks -----------------------------------------

    def events(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Publish committed events to the project's channel (dropped while Redis is away:
        the other processes catch up from the log)."""
        self._put((project_id, _EVENTS, None, events))

    def ephemeral(self, project_id: uuid.UUID, key: uuid.UUID, frame: str) -> None:
        """Publish an encoded ephemeral frame to the project's channel."""
        self._put((project_id, _EPHEMERAL, key, frame))

    def document_updates(
        self, document_id: uuid.UUID, first_seq: int, updates: Sequence[bytes]
    ) -> None:
        """Publish a document's stored updates, one message each (while Redis is away the
        others read them from PostgreSQL)."""
        for offset, update in enumerate(updates):
            self._put((document_id, _DOC_UPDATE, first_seq + offset, update))

    def document_awareness(self, document_id: uuid.UUID, payload: bytes) -> None:
        """Publish an encoded awareness update of a document (lossy)."""
        self._put((document_id, _DOC_AWARENESS, None, payload))

    def _put(self, item: _Outgoing) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._dropped_full.inc()
            self._not_relayed([item])

    def _not_relayed(self, items: Sequence[_Outgoing]) -> None:
        """Remember the newest seq of each project whose events, and of each document
        whose updates, were dropped."""
        unsent = self._unsent
        for owner, kind, key, body in items:
            if kind == _EVENTS and not isinstance(body, str | bytes) and body:
                newest, reached = max(event.seq for event in body), (owner, _LOGGED)
            elif kind == _DOC_UPDATE and isinstance(key, int):
                newest, reached = key, (owner, _DOC_REACHED)
            else:
                continue
            if newest > unsent.get(reached, 0):
                unsent[reached] = newest

    # -- what operators see -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when the bridge can relay both ways now: subscribed (a publish-only bridge:
        Redis answering)."""
        if self._listening:
            return self._connected
        return self._running and self.redis.available

    @property
    def alive(self) -> bool:
        return self._running

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(self._send.statistics().current_buffer_used)

    def snapshot_detail(self) -> dict[str, Any]:
        """Shown in ``/health/supervisor`` under the ``bridge`` child."""
        return {
            "instance": self.instance,
            "connected": self.connected,
            "breaker": self.redis.state,
        }

    # -- the supervised child --------------------------------------------------------------------

    async def run(
        self,
        local: LocalWorkspaces | None,
        *,
        documents: LocalDocuments | None = None,
        task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish what is relayed until cancelled; with ``local``, also receive the other
        processes' messages for the workspaces (and ``documents``) open here
        (re-subscribing after every loss, with a backoff). Redis being away is waited
        out, never raised; anything else (a bug) ends the child for its supervisor to
        restart."""
        try:
            self._running = True
            self._listening = local is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_forever)
                if local is not None:
                    nursery.start_soon(self._listen_forever, local, documents)
                    nursery.start_soon(self._poll_while_degraded, local, documents)
                task_status.started(self)
        finally:
            self._running = False
            self._set_connected(False)

    async def wait_connected(self, connected: bool = True) -> None:
        """Return once the subscriber is ``connected`` (subscribed), or is not."""
        while self._connected is not connected:
            await self._changed.wait()

    def _set_connected(self, connected: bool) -> None:
        if connected is not self._connected:
            self._connected = connected
            self._changed.set()
            self._changed = trio.Event()

    async def _publish_forever(self) -> None:
        receive = self._receive
        while True:
            batch: list[_Outgoing] = []
            if self._unsent:  # wake up to announce them even if nothing else comes
                with trio.move_on_after(_UNSENT_RETRY_SECONDS):
                    batch.append(await receive.receive())
            else:
                batch.append(await receive.receive())
            while len(batch) < _BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            if not self.redis.available:
                self._dropped_unavailable.inc(len(batch))
                self._not_relayed(batch)
                continue
            unsent, self._unsent = self._unsent, {}
            messages = [self._logged(owner, seq, kind) for (owner, kind), seq in unsent.items()]
            messages.extend(self._encode(item) for item in batch)
            if not messages:
                continue
            try:
                if self._skip_replies is None:
                    self._skip_replies = await self.redis.call(replies_can_be_skipped)
                    if not self._skip_replies:
                        log.warning(
                            "bridge: Redis refuses CLIENT REPLY SKIP; cursor moves and job "
                            "progress are published with answers (more CPU per message)"
                        )
                await self.redis.call(partial(publish_all, messages, self._skip_replies))
            except RedisUnavailable as error:
                log.debug("not relayed (%d messages): %s", len(batch), error)
                self._dropped_unavailable.inc(len(batch))
                for reached, seq in unsent.items():
                    self._unsent[reached] = max(seq, self._unsent.get(reached, 0))
                self._not_relayed(batch)
                continue
            if unsent:
                self._published["catch_up"].inc(len(unsent))
            for _, kind, _, _ in batch:
                self._published[_KINDS[kind]].inc()

    def _logged(self, owner: uuid.UUID, seq: int, kind: bytes = _LOGGED) -> Publish:
        """The message that tells others the project's log (``_LOGGED``), or the
        document's updates (``_DOC_REACHED``), reached ``seq``."""
        return self._channel(owner), self._own + kind + b"||" + str(seq).encode(), True

    def _encode(self, item: _Outgoing) -> Publish:
        """``(channel, data, confirm)``: data is ``instance|kind|key|body``, serialised
        once; only events wait for Redis to confirm (see
        ``atrium.seams.redis_wire.publish_all``)."""
        project_id, kind, key, body = item
        if key is None:
            tag = b""
        elif isinstance(key, int):
            tag = str(key).encode()
        else:
            tag = key.hex.encode()
        head = self._own + kind + b"|" + tag + b"|"
        if isinstance(body, str):
            return self._channel(project_id), head + body.encode(), False
        if isinstance(body, bytes):
            return self._channel(project_id), head + body, kind == _DOC_UPDATE
        events = dumps([_event_to_wire(e) for e in body])
        return self._channel(project_id), head + events, True

    def _channel(self, project_id: uuid.UUID) -> str:
        return channel_of(self.instance, project_id)

    async def _listen_forever(
        self, local: LocalWorkspaces, documents: LocalDocuments | None
    ) -> None:
        delay = _RETRY_FIRST
        on_message = partial(self._received_message, local, documents=documents)
        while True:
            try:
                await self.redis.listen(
                    on_message,
                    patterns=patterns_of(self.instance),
                    on_subscribed=partial(self._subscribed, local, documents),
                    ping_seconds=self._ping_seconds,
                )
            except RedisUnavailable as error:
                if self._connected:
                    delay = _RETRY_FIRST  # it was up: a fresh loss
                self._set_connected(False)
                if not self.redis.available:
                    # Subscribe again the moment a probe closes the breaker.
                    log.warning("bridge: %s; degraded until Redis answers a probe", error)
                    await self.redis.wait_available()
                    delay = _RETRY_FIRST
                    continue
                log.warning("bridge: %s; degraded, subscribing again in %.1fs", error, delay)
                await trio.sleep(delay)
                delay = min(_RETRY_MAX, delay * 2)

    async def _poll_while_degraded(
        self, local: LocalWorkspaces, documents: LocalDocuments | None = None
    ) -> None:
        """Every ``poll_seconds``: while degraded, every open workspace and document
        catches up from PostgreSQL; otherwise those that missed a received message (a
        full mailbox)."""
        while True:
            await trio.sleep(self._poll_seconds)
            if not self._connected:
                self._missed.clear()
                self._missed_documents.clear()
                self._catch_up(local.running())
                if documents is not None:
                    self._catch_up_documents(documents.running())
                continue
            if self._missed:
                missed, self._missed = self._missed, set()
                self._catch_up([a for p in missed if (a := local.find(p)) is not None])
            if self._missed_documents and documents is not None:
                gaps, self._missed_documents = self._missed_documents, set()
                self._catch_up_documents([d for i in gaps if (d := documents.find(i)) is not None])

    def _subscribed(self, local: LocalWorkspaces, documents: LocalDocuments | None) -> None:
        """Subscribed (again): what was published before is lost to this subscriber, so
        every open workspace catches up from the log, and every open document from its
        stored updates."""
        self._set_connected(True)
        log.info("bridge: subscribed to %s* as %s", CHANNEL_PREFIX, self.instance)
        self._catch_up(local.running())
        if documents is not None:
            self._catch_up_documents(documents.running())

    def _catch_up(self, actors: Sequence[WorkspaceActor]) -> None:
        self._tell_catch_up(actors, CatchUp())

    def _catch_up_documents(self, actors: Sequence[DocumentActor]) -> None:
        self._tell_catch_up(actors, Reached())

    def _tell_catch_up(
        self, actors: Sequence[WorkspaceActor] | Sequence[DocumentActor], message: Any
    ) -> None:
        """Tell each actor to read what it missed from PostgreSQL; a busy one's next event
        or update fills the gap, and a stopped one is gone."""
        for actor in actors:
            try:
                actor.tell_nowait(message)
            except (MailboxFull, ActorStopped):
                continue
            self._metrics.bridge_catch_ups.inc()

    def _received_message(
        self,
        local: LocalWorkspaces,
        channel: bytes,
        data: bytes,
        *,
        documents: LocalDocuments | None = None,
    ) -> None:
        """Hand another process's message to the project's workspace (or the document's
        actor) if it is open here. A message that does not parse is counted and dropped,
        never raised."""
        try:
            project_id = uuid.UUID(channel.rpartition(b":")[2].decode())
        except ValueError:
            self._invalid.inc()
            return
        at = data.find(b"|") + 1  # past the sender's instance: the kind
        if at and data[at : at + 1] in _DOCUMENT_KINDS:
            if documents is not None:
                self._received_document(documents, project_id, data)
            return
        actor = local.find(project_id)
        if actor is None:
            return
        try:
            _, kind, key, body = data.split(b"|", 3)
            if kind == _EVENTS:
                message: Published | Ephemeral | Behind = Published(
                    [_event_from_wire(project_id, item) for item in orjson.loads(body)]
                )
            elif kind == _EPHEMERAL:
                message = Ephemeral(uuid.UUID(hex=key.decode()), body.decode())
            elif kind == _LOGGED:
                message = Behind(int(body))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("bridge: dropped a message on %r that did not parse: %s", channel, error)
            self._invalid.inc()
            return
        self._received[kind].inc()
        try:
            actor.tell_nowait(message)
        except MailboxFull:
            if kind != _EPHEMERAL:  # lossy by design; events are caught up within a second
                self._missed.add(project_id)
        except ActorStopped:
            pass  # it has no one to deliver to

    def _received_document(
        self, documents: LocalDocuments, document_id: uuid.UUID, data: bytes
    ) -> None:
        actor = documents.find(document_id)
        if actor is None:
            return  # not open here: it loads what is stored when it opens
        try:
            _, kind, key, body = data.split(b"|", 3)
            if kind == _DOC_UPDATE:
                message: Replicated | Reached | RemoteAwareness = Replicated(int(key), [body])
            elif kind == _DOC_AWARENESS:
                message = RemoteAwareness(body)
            else:
                message = Reached(int(body))
        except ValueError as error:
            log.warning("bridge: dropped a document message that did not parse: %s", error)
            self._invalid.inc()
            return
        self._received[kind].inc()
        try:
            actor.tell_nowait(message)
        except MailboxFull:
            if kind != _DOC_AWARENESS:  # lossy by design; updates are caught up
                self._missed_documents.add(document_id)
        except ActorStopped:
            pass


def _is_state(redis: Redis, state: BreakerState) -> float:
    return 1.0 if redis.breaker.state is state else 0.0
