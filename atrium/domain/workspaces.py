"""The registry of live workspaces: one ``WorkspaceActor`` per open project."""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from ..actors import ActorStopped, MailboxFull
from ..actors.workspace import (
    Behind,
    Ephemeral,
    Published,
    Status,
    WorkspaceActor,
    WorkspaceSettings,
)
from ..core.events import Event
from ..persistence import documents as document_store
from ..persistence import events as event_log
from ..persistence.database import Database, DatabaseUnavailable
from ..realtime import protocol
from ..realtime.presence import LocalPresence, PresenceBoard, online_json
from ..realtime.relay import NoRelay, Relay
from ..supervision import Supervisor
from .on_demand import OnDemand

log = logging.getLogger("atrium.workspace")

# How often the connection that follows the log is checked (a lost one delivers nothing).
_FOLLOW_PING_SECONDS = 5.0
# How often a process tells the others on the log that it is there (and whether its relay
# is connected); one not heard for three of these is gone.
PEER_SECONDS = 5.0


class Workspaces:
    """Finds or starts the one WorkspaceActor of a project, and hands committed events to
    it (an ``EventPublisher``).

    The actors run under the ``workspaces`` supervisor that ``run`` opens: the composition
    root starts ``run`` as a child of the root supervisor, so the tree
    owns its lifetime and restarts it; meanwhile ``get`` waits for the new one and ``find``
    finds nothing. One registry serves one database pool (``db``); a new pool gets a new
    registry.

    ``relay`` passes what is committed or sent here on to other processes (the bridge):
    the events ``publish`` is handed, job progress, and through the actors their own
    events and cursors. ``count_gap_fills`` counts events the actors read from the log
    because they had not reached them. ``presence`` is the board every actor tells of its
    connections (this process alone by default; the cluster's with Redis).

    While another process follows the same log and the relay cannot carry this one's
    events to it (this relay is not ``connected``: no Redis, or Redis away; or that
    process said its own is not), the events committed here are also announced on the
    log (PostgreSQL NOTIFY on ``LOG_CHANNEL``), so its open workspaces deliver them at
    once rather than at their next poll. Not while every relay is connected: the commits
    of NOTIFYing transactions queue behind one lock in PostgreSQL, which halves the
    append rate of 16 concurrent writers (``bench/log_notify.py``), for nothing there.
    Processes learn of each other on the log: a greeting when one starts following it
    (``hello``, answered by ``here``), then every ``PEER_SECONDS`` and whenever its relay
    connects or disconnects (``state``), each saying whether its relay is connected. One
    not heard for three periods is gone; a process alone never notifies.
    """

    def __init__(
        self,
        db: Database,
        settings: WorkspaceSettings,
        *,
        max_restarts: int = 5,
        period: float = 30.0,
        count_deliveries: Callable[[int], object] | None = None,
        relay: Relay | None = None,
        count_gap_fills: Callable[[int], object] | None = None,
        presence: PresenceBoard | None = None,
        document_notices: trio.MemorySendChannel[tuple[uuid.UUID, int | None]] | None = None,
    ) -> None:
        """``document_notices`` takes the live documents' appends that other processes
        announce on the log (``atrium.domain.documents.Documents`` reads them)."""
        self._db = db
        self._document_notices = document_notices
        self.presence: PresenceBoard = presence or LocalPresence()
        self._count_deliveries = count_deliveries
        self._relay = relay or NoRelay()
        self._count_gap_fills = count_gap_fills
        self._settings = settings
        self._actors = OnDemand(
            "workspaces", "workspace", WorkspaceActor, max_restarts=max_restarts, period=period
        )
        self.instance = uuid.uuid4().hex
        # The other processes heard on the log: when last (trio clock), and whether their
        # relay was connected then (``_cut_off``: those whose relay was not).
        self._peers: dict[str, float] = {}
        self._cut_off: set[str] = set()
        self._greet, self._greetings = trio.open_memory_channel[str](math.inf)

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the workspace supervisor (one_for_one; ``max_restarts`` in ``period``
        seconds, else it escalates) and serve ``get`` from it until cancelled, following
        the log for events other processes commit (``follow_log``)."""
        async with self._actors.open() as supervisor:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._greet_forever)
                nursery.start_soon(self._tell_state_forever)
                nursery.start_soon(self._watch_relay)
                nursery.start_soon(self.follow_log)
                task_status.started(supervisor)
                await trio.sleep_forever()

    async def follow_log(self) -> None:
        """Until cancelled: when another process commits events to a project whose
        workspace is live here (a separate job worker's), that workspace reads them from
        the log and delivers them in seq order (PostgreSQL NOTIFY on ``LOG_CHANNEL``).
        A database outage is waited out; listening resumes with a backoff. Each time
        listening (re)starts, this process greets the others that follow the log."""
        await self._db.follow(
            event_log.LOG_CHANNEL,
            self._appended,
            ping_seconds=_FOLLOW_PING_SECONDS,
            on_listen=partial(self._greet.send_nowait, "hello"),
        )

    def notifies(self) -> bool:
        """True when events committed here must be announced on the log: another process
        follows it, and the relay cannot reach it now (this relay or its own is not
        connected)."""
        return bool(self._peers) and (bool(self._cut_off) or not self._relay.connected)

    @property
    def peers(self) -> frozenset[str]:
        """The other processes that follow the log, as heard now (their ``instance``)."""
        return frozenset(self._peers)

    async def _greet_forever(self) -> None:
        async for word in self._greetings:
            try:
                await event_log.notify_peer(
                    self._db, self.instance, word, connected=self._relay.connected
                )
            except DatabaseUnavailable as error:
                # Said again when listening resumes (``follow_log``), or at the next period.
                log.debug("greeting on the log: %s", error)

    async def _tell_state_forever(self) -> None:
        """Every PEER_SECONDS: say this process is there, and forget the processes that
        have not said so for three periods."""
        while True:
            await trio.sleep(PEER_SECONDS)
            self._greet.send_nowait("state")
            gone = trio.current_time() - 3 * PEER_SECONDS
            for instance in [i for i, heard in self._peers.items() if heard < gone]:
                log.info("process %s no longer heard on the log", instance)
                del self._peers[instance]
                self._cut_off.discard(instance)

    async def _watch_relay(self) -> None:
        """Tell the others at once when this process's relay connects or disconnects."""
        told = self._relay.connected
        while True:
            await self._relay.wait_connected(not told)
            told = not told
            self._greet.send_nowait("state")

    def _heard(self, instance: str, word: str, connected: bool) -> None:
        if instance == self.instance:
            return
        if instance not in self._peers:
            log.info("another process follows the log: %s", instance)
        self._peers[instance] = trio.current_time()
        if connected:
            self._cut_off.discard(instance)
        else:
            self._cut_off.add(instance)
        if word == "hello":
            self._greet.send_nowait("here")

    def _appended(self, payload: str) -> None:
        peer = event_log.parse_peer(payload)
        if peer is not None:
            self._heard(*peer)
            return
        document = document_store.parse_reached(payload)
        if document is not None:
            if self._document_notices is not None:
                # A full channel drops it: the document's next update or poll fills the gap.
                with contextlib.suppress(trio.WouldBlock):
                    self._document_notices.send_nowait(document)
            return
        parsed = event_log.parse_appended(payload)
        actor = None if parsed is None else self.find(parsed[0])
        if parsed is not None and actor is not None:
            # A full mailbox drops this one: the workspace's next event fills the gap.
            with contextlib.suppress(MailboxFull, ActorStopped):
                actor.tell_nowait(Behind(parsed[1]))

    async def get(self, project_id: uuid.UUID) -> WorkspaceActor:
        """The running actor of ``project_id`` (started on first use; never two). Waits
        while the workspace supervisor (re)starts."""
        return await self._actors.get(
            project_id,
            lambda: WorkspaceActor(
                project_id,
                self._db,
                self._settings,
                count_deliveries=self._count_deliveries,
                relay=self._relay,
                count_gap_fills=self._count_gap_fills,
                presence=self.presence,
                notify_log=self.notifies,
            ),
        )

    def find(self, project_id: uuid.UUID) -> WorkspaceActor | None:
        """The actor of ``project_id`` if one is running now (never starts one)."""
        return self._actors.find(project_id)

    def running(self) -> list[WorkspaceActor]:
        """The actors running now (a snapshot)."""
        return self._actors.running()

    def overview(self, limit: int) -> tuple[int, int, list[dict[str, Any]]]:
        """The workspaces running in this process now: how many, their connections all
        together, and at most ``limit`` of them, the most connected first, each with
        ``project_id``, ``mailbox_depth``, ``processed`` (messages handled) and the
        actor's ``overview()`` (connections and users). Reads no database and waits on
        no actor."""
        shown = []
        for actor in self.running():
            statistics = actor.statistics()
            shown.append(
                {
                    "project_id": str(actor.project_id),
                    "mailbox_depth": statistics.mailbox_depth,
                    "processed": statistics.processed,
                    **actor.overview(),
                }
            )
        shown.sort(key=lambda w: (-w["connections"], w["project_id"]))
        connections = sum(w["connections"] for w in shown)
        return len(shown), connections, shown[:limit]

    async def status(self, project_id: uuid.UUID) -> dict[str, Any]:
        """Who is in the project's live workspace now (the seed's fields): from its actor
        when one runs here, else from the presence board (the users on other processes)
        at the log's last seq."""
        actor = self.find(project_id)
        if actor is not None:
            try:
                status: dict[str, Any] = await actor.ask(Status(), timeout=5.0)
                return status
            except ActorStopped:
                pass  # stopped between find and ask: it has nobody online
        online = await self.presence.online(project_id, {})
        return {
            "project_id": project_id,
            "active_collaborators": len(online),
            "connections": sum(user.connections for user in online.values()),
            "online_users": online_json(online),
            "workspace_url": f"/ws/{project_id}",
            "real_time_events": 0,
            "seq": await event_log.last_seq(self._db, project_id),
        }

    async def progress(self, project_id: uuid.UUID, key: uuid.UUID, frame: dict[str, Any]) -> None:
        """Send an ephemeral frame (a job's progress) to the project's workspace, here if
        it is open here and in other processes through the relay; a newer frame with the
        same ``key`` replaces one not yet sent."""
        encoded = protocol.encode(frame)
        self._relay.ephemeral(project_id, key, encoded)
        actor = self.find(project_id)
        if actor is not None:
            try:
                actor.tell_nowait(Ephemeral(key, encoded))
            except (ActorStopped, MailboxFull):
                pass  # ephemeral: the next report, or the job's end event, follows

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Hand committed log events to the project's workspace, if it is open here, and
        to the relay for other processes (announced on the log too while the relay cannot
        reach them: ``notifies``)."""
        if not events:
            return
        self._relay.events(project_id, events)
        actor = self.find(project_id)
        if actor is not None:
            try:
                await actor.tell(Published(events))
            except ActorStopped:
                log.debug("workspace %s stopped before its events arrived", project_id)
        if self.notifies():
            # Job events were announced in their own transaction already: announcing
            # them twice while degraded costs a notification, not a flag on every caller.
            try:
                await event_log.notify_reached(self._db, project_id, max(e.seq for e in events))
            except DatabaseUnavailable as error:
                # Durable all the same: the others read them at their next poll or gap.
                log.warning("announcing events of %s on the log: %s", project_id, error)
