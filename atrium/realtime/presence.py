"""Who is online in a project's workspace: this process alone, or the whole cluster.

A ``WorkspaceActor`` keeps its own connections and asks a ``PresenceBoard`` two things:
whether a connection that arrives or goes is its user's first or last one (the USER_JOIN
or USER_LEAVE to store), and who is online (``PRESENCE_STATE``, the workspace status).

``LocalPresence`` (one process, no Redis) answers from the actor's own counts.
``ClusterPresence`` (with REDIS_URL) keeps every process's counts in Redis
(``persistence.presence``): the union is shown, a user with tabs on two processes joins
once and leaves once, and a heartbeat keeps this process's entries alive. A process that
dies stops heartbeating; within ``ttl_seconds`` plus one heartbeat another process reaps
its entries and stores USER_LEAVE for its users who are connected nowhere else. When
Redis cannot be reached, the board answers as ``LocalPresence`` would (a user may then
join or leave once per process) and writes this process's whole state again once Redis
answers.

Redis holds no truth, and may come back without what it held (a restart without
persistence, FLUSHALL, a failover that lost the last writes). So a process re-asserts its
own entries (alive key, users, counts) before it trusts a total from Redis again: a write
that finds Redis does not hold this process's last generation is refused, and the process
rewrites everything, then counts. And each process keeps a copy of the other processes'
entries (``_copies``: per remote user, the process it came through), refreshed at every
heartbeat; when Redis lost a process's entries and that process has not re-asserted them,
the copy is put back with a fresh TTL, so if that process died (even at the moment Redis
came back, before it could re-assert anything) its users are reaped and leave within
``ttl_seconds`` plus a heartbeat or two, as without the loss. Until a lost process's
entries are back, who is online (a tab's ``PRESENCE_STATE``, which no later USER_JOIN
corrects) includes its users from the copy, and a join or leave that re-asserts this
process's entries puts the lost copies back before it counts.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import orjson
import trio

from ..core.breaker import BreakerState
from ..core.config import DEFAULTS
from ..core.events import EventType, NewEvent
from ..core.projects import ProjectNotFound
from ..core.timestamps import utc_iso_at
from ..persistence import events as event_log
from ..persistence.batching import Batcher
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.presence import Copy, Entry, PresenceStore, Roster, Someone, Totals
from ..persistence.redis import Redis, RedisUnavailable

log = logging.getLogger("atrium.presence")

ACTIVE_SECONDS = 300.0  # a user seen within this is "active", else "idle"
# After a heartbeat that could not reach Redis, the next one comes this soon at most (and
# at once when the breaker's probe finds Redis back).
_RETRY_SECONDS = 0.5


class Transition(enum.Enum):
    """What a change of a user's connections means for the project's log."""

    NONE = "none"
    JOINED = "joined"  # online nowhere before: store USER_JOIN
    LEFT = "left"  # online nowhere now: store USER_LEAVE


@dataclass(frozen=True, slots=True)
class Decision:
    """A transition and, when the cluster decided it, its ``version`` (the order of the
    user's transitions in the project; None: decided by this process alone)."""

    transition: Transition
    version: int | None = None


_NONE = Decision(Transition.NONE)


@dataclass(frozen=True, slots=True)
class OnlineUser:
    """A user's connections to a project and when they were last active (epoch s)."""

    connections: int
    last_seen: float


def presence_event(
    kind: EventType, user_id: uuid.UUID, email: str, version: int | None = None
) -> NewEvent:
    """A USER_JOIN or USER_LEAVE with the seed's fields, and the ``version`` of the
    transition when the cluster decided it (stored only in that order)."""
    what = "entered the workspace" if kind is EventType.USER_JOIN else "left the workspace"
    payload = {"email": email, "message": f"User {email} {what}"}
    return NewEvent(kind, user_id, payload, presence_version=version)


def online_json(users: Mapping[uuid.UUID, OnlineUser]) -> list[dict[str, Any]]:
    """``users`` as ``PRESENCE_STATE`` and the workspace status list them."""
    now = time.time()
    return [
        {
            "user_id": str(user_id),
            "connections": user.connections,
            "last_seen": utc_iso_at(user.last_seen),
            "status": "active" if now - user.last_seen < ACTIVE_SECONDS else "idle",
        }
        for user_id, user in users.items()
    ]


class PresenceBoard(Protocol):
    """What a workspace tells about its connections, and asks about everyone's.

    ``connections`` is always how many connections of the user to the project this
    process holds after the change. Never raises for want of Redis.
    """

    async def joined(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        """One more connection of the user here."""
        ...

    async def left(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        """One connection of the user fewer here."""
        ...

    def seen(self, project_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """The user was active (an edit, a cursor move)."""
        ...

    def dropped(self, project_id: uuid.UUID, user_id: uuid.UUID, connections: int) -> None:
        """Connections went without a USER_LEAVE (the user was removed from the project)."""
        ...

    def vacate(self, project_id: uuid.UUID) -> None:
        """The project's workspace stopped here: none of its connections remain."""
        ...

    async def online(
        self, project_id: uuid.UUID, here: Mapping[uuid.UUID, OnlineUser]
    ) -> dict[uuid.UUID, OnlineUser]:
        """Everyone online in the project: ``here`` (this process's users) and the rest."""
        ...


class LocalPresence:
    """One process's presence: a user's first connection here joins, the last leaves."""

    async def joined(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        return Decision(Transition.JOINED) if connections == 1 else _NONE

    async def left(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        return Decision(Transition.LEFT) if connections == 0 else _NONE

    def seen(self, project_id: uuid.UUID, user_id: uuid.UUID) -> None:
        pass

    def dropped(self, project_id: uuid.UUID, user_id: uuid.UUID, connections: int) -> None:
        pass

    def vacate(self, project_id: uuid.UUID) -> None:
        pass

    async def online(
        self, project_id: uuid.UUID, here: Mapping[uuid.UUID, OnlineUser]
    ) -> dict[uuid.UUID, OnlineUser]:
        return dict(here)


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    """A heartbeat every ``heartbeat_seconds`` keeps this process's entries alive for
    ``ttl_seconds``; each heartbeat also reaps processes whose entries outlived theirs.
    A workspace waits at most ``answer_seconds`` for Redis to answer a join, a leave or
    who is online (twice that when the heartbeat holds the board), then answers from
    this process's own view: a slow or hanging Redis must not stall the other work of
    the workspace (everyone's edits) for the client's whole timeout."""

    heartbeat_seconds: float = DEFAULTS.presence_heartbeat_seconds
    ttl_seconds: float = DEFAULTS.presence_ttl_seconds
    answer_seconds: float = 0.25


@dataclass(slots=True)
class _Held:
    """This process's connections of one user to one project."""

    count: int
    email: str
    seen: float  # epoch s


Slot = tuple[uuid.UUID, uuid.UUID]  # (project, user)


@dataclass(frozen=True, slots=True)
class _Count:
    """A workspace's new count of a user's connections here, waiting to be written; and
    the decision to give when Redis cannot decide."""

    slot: Slot
    email: str
    connections: int
    alone: Decision


def _decision(totals: Totals) -> Decision:
    if totals.came_online:
        return Decision(Transition.JOINED, totals.version)
    if totals.went_offline:
        return Decision(Transition.LEFT, totals.version)
    return _NONE


class ClusterPresence:
    """Presence across every process that shares ``redis`` (see the module docstring).

    This process's own counts are kept here too (``_held``), so that Redis can be told
    all of them again after it was unreachable, restarted, or reaped this process. One
    lock orders every write of this process's entries, so Redis sees them in the order
    they were made. ``run`` is the heartbeat and reaper; the USER_JOIN and USER_LEAVE it
    stores (for reaped processes' users, or for this process's own users after it was
    reaped while cut off from Redis) are appended to the log with a NOTIFY, so every
    process's open workspace delivers them.
    """

    def __init__(
        self,
        redis: Redis,
        db: Database,
        settings: PresenceSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = uuid.uuid4().hex
        self._redis = redis
        self._ttl_ms = int(settings.ttl_seconds * 1000)
        floor = partial(event_log.presence_version_floor, db)  # versions never go back
        self._store = PresenceStore(redis, self.instance, floor=floor)
        # What a workspace waits for (joins, leaves, who is online): answered quickly or
        # not at all.
        self._quick = self._store.answering_within(settings.answer_seconds)
        # The other processes' entries as last read from Redis, by instance.
        self._copies: dict[str, Copy] = {}
        self._db = db
        self._settings = settings
        self._clock = clock
        self._held: dict[Slot, _Held] = {}
        self._dirty: set[Slot] = set()  # changed here, not yet written to Redis
        self._full = True  # write every entry at the next heartbeat (nothing written yet)
        self._lock = trio.Lock()
        self._announcements: list[tuple[EventType, Someone]] = []  # still to store
        self._reachable = True
        self._wake = trio.Event()  # set: write what changed without waiting for the beat
        # The workspaces' joins and leaves, and their questions of who is online, that
        # come while one call is out go to Redis together in the next: a join storm over
        # many projects makes a round trip per batch, not per join.
        self._counts: Batcher[_Count, Decision] = Batcher(self._write_counts)
        self._rosters: Batcher[uuid.UUID, tuple[Roster, Mapping[str, Copy]]] = Batcher(
            self._read_rosters
        )

    # -- the board --------------------------------------------------------------------------

    async def joined(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        alone = Decision(Transition.JOINED) if connections == 1 else _NONE
        return await self._count(project_id, user_id, email, connections, alone)

    async def left(
        self, project_id: uuid.UUID, user_id: uuid.UUID, email: str, connections: int
    ) -> Decision:
        alone = Decision(Transition.LEFT) if connections == 0 else _NONE
        return await self._count(project_id, user_id, email, connections, alone)

    def seen(self, project_id: uuid.UUID, user_id: uuid.UUID) -> None:
        held = self._held.get((project_id, user_id))
        if held is not None:
            held.seen = self._clock()
            self._dirty.add((project_id, user_id))

    def dropped(self, project_id: uuid.UUID, user_id: uuid.UUID, connections: int) -> None:
        slot = (project_id, user_id)
        held = self._held.get(slot)
        if held is not None:
            self._hold(slot, held.email, connections)
            self._dirty.add(slot)
            self._wake.set()

    def vacate(self, project_id: uuid.UUID) -> None:
        for slot in [s for s in self._held if s[0] == project_id]:
            del self._held[slot]
            self._dirty.add(slot)
            self._wake.set()

    async def online(
        self, project_id: uuid.UUID, here: Mapping[uuid.UUID, OnlineUser]
    ) -> dict[uuid.UUID, OnlineUser]:
        try:
            roster, copies = await self._rosters.call(project_id)
        except RedisUnavailable:
            return dict(here)
        users = dict(here)

        def add(user_id: uuid.UUID, connections: int, seen: float) -> None:
            # Redis may not have this process's latest yet, nor a restored copy's.
            known = users.get(user_id)
            if known is not None:
                connections = max(connections, known.connections)
                seen = max(seen, known.last_seen)
            users[user_id] = OnlineUser(connections, seen)

        for member in roster.members:
            add(member.user_id, member.connections, member.seen_ms / 1000)
        # Redis lost these processes' entries and they are not back yet (a restart, a
        # FLUSHALL, a failover): their users are online as far as the log knows, and a
        # PRESENCE_STATE without them would show them offline to a tab that no USER_JOIN
        # corrects (when they come back, it is no transition).
        for instance in roster.lost:
            for raw in copies[instance].entries.values():
                entry = orjson.loads(raw)
                if entry["p"] == str(project_id):
                    add(uuid.UUID(entry["u"]), int(entry["n"]), self._clock())
        return users

    async def _read_rosters(
        self, project_ids: Sequence[uuid.UUID]
    ) -> list[tuple[Roster, Mapping[str, Copy]]]:
        """The rosters of the projects whose workspaces wait to know who is online, in one
        call (``_rosters``), each with the copies of the others' entries it was read
        against."""
        copies = dict(self._copies)
        rosters = await self._quick.rosters(
            project_ids, {instance: copy.generation for instance, copy in copies.items()}
        )
        return [(roster, copies) for roster in rosters]

    def _hold(self, slot: Slot, email: str, connections: int) -> Entry:
        """Record this process's count for ``slot``; the entry to write to Redis."""
        now = self._clock()
        held = self._held.get(slot)
        if connections <= 0:
            self._held.pop(slot, None)
        elif held is None:
            held = self._held[slot] = _Held(connections, email, now)
        else:
            held.count, held.email = connections, email
            held.seen = now
        return self._entry(slot)

    def _entry(self, slot: Slot) -> Entry:
        held = self._held.get(slot)
        if held is None:
            return Entry(slot[0], slot[1], 0, "", 0)
        return Entry(slot[0], slot[1], held.count, held.email, int(held.seen * 1000))

    async def _count(
        self,
        project_id: uuid.UUID,
        user_id: uuid.UUID,
        email: str,
        connections: int,
        alone: Decision,
    ) -> Decision:
        """The transition Redis decided for the user's new count here (``_write_counts``,
        together with the other workspaces' counts that wait meanwhile)."""
        return await self._counts.call(_Count((project_id, user_id), email, connections, alone))

    async def _write_counts(self, counts: Sequence[_Count]) -> list[Decision]:
        """Write the counts here and to Redis in one call, in order; for each, the
        transition Redis decided (with its version), or ``alone`` (this process's own
        view, no version) when Redis cannot be reached, or does not answer (or the
        heartbeat does not let go of the board) within ``answer_seconds``."""
        alone = [count.alone for count in counts]
        with trio.move_on_after(self._settings.answer_seconds) as waited:
            await self._lock.acquire()
        if waited.cancelled_caught:
            # The heartbeat holds the board, stuck on Redis: a later beat writes these.
            for count in counts:
                self._hold(count.slot, count.email, count.connections)
                self._dirty.add(count.slot)
            return alone
        try:
            was: dict[Slot, Entry] = {}
            entries = []
            for count in counts:
                was.setdefault(count.slot, self._entry(count.slot))
                entries.append(self._hold(count.slot, count.email, count.connections))
            try:
                totals = await self._quick.set_counts(entries)
            except RedisUnavailable:
                # Written or not (a call that timed out may have run): the next beat
                # writes these entries again, whatever Redis holds of them.
                self._dirty.update(was)
                return alone
            if totals is None:
                # Redis lost what this process wrote: re-assert first, and put back what
                # it knows of the others' (a user on another process that has not
                # re-asserted yet is online all the same).
                try:
                    await self._reassert(self._quick, was)
                    await self._reconcile(self._quick)
                    totals = await self._quick.set_counts(entries)
                except RedisUnavailable:
                    totals = None
                if totals is None:
                    self._full = True  # unknown what Redis holds: write everything later
                    return alone
        finally:
            self._lock.release()
        return [_decision(t) for t in totals]

    # -- heartbeat and reaper ---------------------------------------------------------------

    def snapshot_detail(self) -> dict[str, Any]:
        """For ``/health/supervisor``: this process's instance id and what it holds."""
        return {
            "instance": self.instance,
            "redis": "reachable" if self._reachable else "unreachable",
            "users_here": len(self._held),
            "users_elsewhere": sum(len(c.entries) for c in self._copies.values()),
            "events_to_store": len(self._announcements),
        }

    async def run(
        self, *, task_status: trio.TaskStatus[ClusterPresence] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Heartbeat every ``heartbeat_seconds`` until cancelled (``beat``), at once when
        connections went without a USER_LEAVE (``dropped``, ``vacate``), so the union
        stops showing them, and at once when Redis answers again after the breaker
        opened (every ``_RETRY_SECONDS`` while a beat cannot reach it otherwise)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wake_when_redis_returns)
            task_status.started(self)
            while True:
                await self.beat()
                wait = self._settings.heartbeat_seconds
                if not self._reachable:
                    wait = min(wait, _RETRY_SECONDS)
                with trio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _wake_when_redis_returns(self) -> None:
        while True:
            await self._redis.breaker.wait_state(BreakerState.OPEN)
            await self._redis.wait_available()
            self._wake.set()

    async def beat(self) -> None:
        """Keep this process's entries alive, write what changed since the last beat (all
        of it after a Redis failure, or when Redis lost or reaped them), reap processes
        whose heartbeat stopped, and store the USER_JOIN/USER_LEAVE that follow. A Redis
        or database outage is waited out: what is still to write stays for the next beat.
        """
        try:
            async with self._lock:
                found = await self._store.heartbeat(self._ttl_ms)
                # Reaped, or Redis lost what it held: rewrite every entry.
                full = self._full or not found.was_alive or found.was_reaped or not found.current
                dirty, self._dirty = self._dirty, set()
                slots: Iterable[Slot] = self._held if full else dirty
                entries = [self._entry(slot) for slot in slots]
                try:
                    came = await self._store.sync(entries, full=full) if entries or full else []
                    if came is None:  # lost since the heartbeat: rewrite everything
                        came = await self._store.sync(self._entries(), full=True)
                except BaseException:
                    self._dirty |= dirty
                    raise
                self._full = False
            if found.was_reaped:  # another process stored USER_LEAVE for them
                self._announcements += [(EventType.USER_JOIN, s) for s in came or ()]
            await self._reconcile(self._store)
            self._announcements += [(EventType.USER_LEAVE, s) for s in await self._store.reap()]
            self._reached(None)
        except RedisUnavailable as error:
            self._full = True
            self._reached(error)
        await self._announce()

    def _entries(self, instead: Mapping[Slot, Entry] | None = None) -> list[Entry]:
        """Every entry of this process, with ``instead``'s in place of those it names."""
        entries = {slot: self._entry(slot) for slot in self._held}
        entries.update(instead or {})
        return [entry for entry in entries.values() if entry.count > 0]

    async def _reassert(self, store: PresenceStore, instead: Mapping[Slot, Entry]) -> None:
        """Under the lock: make this process alive and rewrite all its entries (with
        ``instead``'s, those not counted yet, in place of the held ones; left out if this
        process was reaped), as a heartbeat that found Redis without them does."""
        found = await store.heartbeat(self._ttl_ms)
        if found.was_reaped:  # their users left: the count to come is their join
            instead = {slot: Entry(slot[0], slot[1], 0, "", 0) for slot in instead}
        dirty, self._dirty = self._dirty, set()
        try:
            came = await store.sync(self._entries(instead), full=True)
        except BaseException:
            self._dirty |= dirty
            raise
        self._full = False
        if found.was_reaped:  # another process stored USER_LEAVE for them
            self._announcements += [(EventType.USER_JOIN, s) for s in came or ()]
            self._wake.set()
        log.info("presence: Redis did not hold this process's entries; all rewritten")

    async def _reconcile(self, store: PresenceStore) -> None:
        """Refresh the copies of the other processes' entries, and put back those Redis
        lost (a restart, FLUSHALL, a failover) for processes that have not re-asserted
        them: alive for one TTL more, then reaped (their users leave) unless they
        heartbeat by then."""
        view = await store.view(self._copies)
        for instance in view.gone:
            self._copies.pop(instance, None)
        for instance, copy in view.changed.items():
            if copy.entries:
                self._copies[instance] = copy
            else:
                self._copies.pop(instance, None)
        for instance in view.lost:
            kept = self._copies.get(instance)
            if kept is None:  # dropped by a reconcile that ran meanwhile (a beat, a count)
                continue
            now_ms = int(self._clock() * 1000)
            if await store.restore(instance, kept, ttl_ms=self._ttl_ms, now_ms=now_ms):
                log.warning(
                    "presence: Redis lost the entries of process %s; its %d users put back "
                    "until it rewrites them or its TTL runs out",
                    instance,
                    len(kept.entries),
                )

    def _reached(self, error: RedisUnavailable | None) -> None:
        if error is None and not self._reachable:
            log.info("presence: Redis reachable again; this process's entries rewritten")
        elif error is not None and self._reachable:
            log.warning("presence: %s; presence is this process's alone until it returns", error)
        self._reachable = error is None

    async def _announce(self) -> None:
        """Store the pending USER_JOIN/USER_LEAVE events, one transaction per project;
        those the database could not take wait for the next beat."""
        pending, self._announcements = self._announcements, []
        by_project: dict[uuid.UUID, list[tuple[EventType, Someone]]] = {}
        for kind, someone in pending:
            by_project.setdefault(someone.project_id, []).append((kind, someone))
        for project_id, items in by_project.items():
            events = [presence_event(kind, s.user_id, s.email, s.version) for kind, s in items]
            try:
                await event_log.append_presence(self._db, project_id, events, notify=True)
            except ProjectNotFound:
                pass  # deleted meanwhile: nobody is left to tell
            except DatabaseUnavailable as error:
                log.warning("presence: storing %d events of %s: %s", len(events), project_id, error)
                self._announcements += items
