"""The registry of live documents: one ``DocumentActor`` per open document.

Documents are named by project and path (``open`` finds or creates one) and served by
id (``get``). The actors run under the ``documents`` supervisor that ``run`` opens, as
the workspaces' run under theirs (``atrium.domain.workspaces``): the composition root
starts ``run`` as a child of the root supervisor. An actor starts on first use, loading
its snapshot and the updates after it; it stops (compacting first) once idle with no
peers; a crash restarts it from PostgreSQL.

With several processes, each one serving a document's peers runs a replica of it (see
``atrium.actors.document``): updates and awareness cross on the ``relay`` (the bridge),
and notices that a document reached a seq (NOTIFY on the log, while the relay cannot
carry updates) arrive on ``notices``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..actors import ActorStopped, MailboxFull
from ..actors.document import (
    CloseAll,
    DocumentActor,
    DocumentSettings,
    DropUser,
    Message,
    Reached,
)
from ..core.events import Event, EventType
from ..persistence import documents as store
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.documents import DocumentRef, DocumentRow
from ..realtime.protocol import CloseCode
from ..realtime.relay import DocumentRelay
from ..supervision import Supervisor
from .on_demand import OnDemand

log = logging.getLogger("atrium.documents")

EditHook = Callable[[uuid.UUID, DocumentRef], None]
"""Told ``(user_id, ref)`` for each stored update a user made; must not block or raise."""


def _no_activity(user_id: uuid.UUID, ref: DocumentRef) -> None:
    pass


class Documents:
    """Finds or starts the one DocumentActor of a document.

    One registry serves one database pool (``db``); a new pool gets a new registry.
    ``on_edit`` is the activity hook every actor calls for each update a user made that
    changed its document, after it is stored (a no-op by default). ``relay`` carries the
    actors' updates and awareness to the other processes; while ``notify_log()`` is true
    each append is also announced on the log. ``notices`` yields ``(document id, seq)``
    for appends other processes announced on the log, and ``(document id, None)`` for a
    document deleted (or its project) by any process (``run`` reads it).
    """

    def __init__(
        self,
        db: Database,
        settings: DocumentSettings,
        *,
        max_restarts: int = 5,
        period: float = 30.0,
        on_edit: EditHook | None = None,
        relay: DocumentRelay | None = None,
        notify_log: Callable[[], bool] | None = None,
        notices: trio.MemoryReceiveChannel[tuple[uuid.UUID, int | None]] | None = None,
    ) -> None:
        self._db = db
        self._relay = relay
        self._notify_log = notify_log
        self._notices = notices
        self._settings = settings
        self._on_edit: EditHook = on_edit or _no_activity
        self._actors = OnDemand(
            "documents", "document", DocumentActor, max_restarts=max_restarts, period=period
        )

    @property
    def settings(self) -> DocumentSettings:
        return self._settings

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the documents supervisor (one_for_one; ``max_restarts`` in ``period``
        seconds, else it escalates) and serve ``get`` from it until cancelled, handing
        the notices of other processes' appends to the documents open here."""
        async with self._actors.open() as supervisor:
            task_status.started(supervisor)
            if self._notices is None:
                await trio.sleep_forever()
            async for document_id, seq in self._notices:
                actor = self.find(document_id)
                if actor is not None:
                    # A full mailbox drops it: the next update, or a poll, fills the gap.
                    with contextlib.suppress(MailboxFull, ActorStopped):
                        actor.tell_nowait(Reached(seq))
            await trio.sleep_forever()

    async def open(
        self, project_id: uuid.UUID, path: str, created_by: uuid.UUID | None = None
    ) -> DocumentRef:
        """The document of ``project_id`` at ``path``, created empty when there is none.
        Role checks are the caller's. Raises DocumentNotFound when the project is gone,
        DatabaseUnavailable."""
        row = await store.open_document(self._db, project_id, path, created_by)
        return row.ref

    async def describe(self, document_id: uuid.UUID) -> DocumentRow | None:
        """The document's row (no bytes), or None."""
        return await store.find_document(self._db, document_id)

    async def of_project(self, project_id: uuid.UUID) -> list[DocumentRow]:
        """The project's documents, by path."""
        return await store.list_documents(self._db, project_id)

    async def get(self, document_id: uuid.UUID) -> DocumentActor:
        """The running actor of the document (started on first use, loaded from
        PostgreSQL; never two). Waits while the documents supervisor (re)starts.

        A value may stop at any moment afterwards (idle, or reloading after the database
        went away): on ActorStopped, call again. Raises DocumentNotFound (also for a
        deleted project's document), DatabaseUnavailable.
        """
        running = self.find(document_id)
        if running is not None:
            return running
        ref = (await store.find_live_document(self._db, document_id)).ref
        return await self._actors.get(
            document_id,
            lambda: DocumentActor(
                ref,
                self._db,
                self._settings,
                on_edit=self._on_edit,
                relay=self._relay,
                notify_log=self._notify_log,
            ),
        )

    def find(self, document_id: uuid.UUID) -> DocumentActor | None:
        """The actor of the document if one is running now (never starts one)."""
        return self._actors.find(document_id)

    def running(self) -> list[DocumentActor]:
        """The actors running now (a snapshot)."""
        return self._actors.running()

    async def delete(self, document_id: uuid.UUID) -> bool:
        """Delete the document (role checks are the caller's); its live peers are closed
        with 4013. False when there was none."""
        deleted = await store.delete_document(self._db, document_id)
        actor = self.find(document_id)
        if actor is not None:
            with contextlib.suppress(ActorStopped):
                await actor.tell(CloseAll(CloseCode.DOCUMENT_DELETED, "document_deleted"))
        return deleted

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Apply committed project events to the project's open documents (an
        ``EventPublisher``): a removed member's peers are dropped (4005) and a deleted
        project's documents close every peer (4006) and stop, in mailbox order, so
        nothing those peers queued is applied after (their appends are refused from the
        commit on). Other processes' replicas of a deleted project's documents are told
        on the log and do the same. (A changed role is the document socket's to handle:
        it reconnects with the new role, 4014.)"""
        messages: list[Message] = []
        for event in events:
            if event.type is EventType.PROJECT_DELETED:
                messages.append(CloseAll(CloseCode.PROJECT_DELETED, "project_deleted"))
                try:
                    await store.announce_deleted(self._db, project_id)
                except DatabaseUnavailable as error:
                    # Their next append is refused and closes them; a socket's periodic
                    # membership check closes the idle ones.
                    log.warning("announcing the deletion of %s's documents: %s", project_id, error)
            elif event.type is EventType.MEMBER_REMOVED:
                user_id = uuid.UUID(str(event.payload.get("user_id")))
                messages.append(DropUser(user_id, CloseCode.MEMBER_REMOVED, "member_removed"))
        if not messages:
            return
        for actor in self.running():
            if actor.ref.project_id == project_id:
                for message in messages:
                    with contextlib.suppress(ActorStopped):
                        await actor.tell(message)

    def overview(self, limit: int) -> tuple[int, int, list[dict[str, Any]]]:
        """The documents open in this process now: how many, their peers all together,
        and at most ``limit`` of them, the most connected first, each the actor's
        ``overview()`` with its ``mailbox_depth``. Reads no database, waits on no actor."""
        shown = []
        for actor in self.running():
            shown.append({**actor.overview(), "mailbox_depth": actor.statistics().mailbox_depth})
        shown.sort(key=lambda d: (-d["peers"], d["document_id"]))
        peers = sum(d["peers"] for d in shown)
        return len(shown), peers, shown[:limit]


__all__ = ["Documents", "DocumentRef", "EditHook"]
