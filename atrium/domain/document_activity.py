"""Live-document edits as workspace activity: coalesced ``DOCUMENT_EDITED`` events.

Every document actor tells ``note`` of each stored update a user made (the registry's
edit hook). Typing sends dozens of updates a second, and the project's event log and its
live workspaces want to know *who is editing which document*, not every keystroke, and
never the bytes. So edits are gathered per document and logged at most once per
``window`` seconds (DOC_ACTIVITY_SECONDS): the first edit after a quiet window is logged
at once (a workspace sees someone start editing without waiting), the edits after it
are gathered until the window has passed and then logged as one event naming every
editor and how many updates they made. A process that stops logs what it gathered.

An event is appended to the project's log like any other (a gapless seq, then handed to
the live workspaces by the publisher). It is activity, not content: when it cannot be
stored (the database away, the project deleted), it is dropped with a log line, and the
document itself has lost nothing.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import trio

from ..core.events import EventPublisher, EventType, NewEvent
from ..persistence import events as event_log
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.documents import DocumentRef
from ..persistence.projects import ProjectNotFound

log = logging.getLogger("atrium.documents")

# How long a stopping process spends logging the edits it gathered but has not logged.
_LAST_WORDS_SECONDS = 2.0


@dataclass(slots=True)
class _Gathered:
    """The edits of one document not logged yet, and when they may be."""

    ref: DocumentRef
    due: float  # trio clock
    editors: dict[uuid.UUID, int] = field(default_factory=dict)  # updates, first editor first
    last_editor: uuid.UUID | None = None


class DocumentActivity:
    """Turns the edits ``note`` is told of into coalesced ``DOCUMENT_EDITED`` events.

    ``run`` (a task the ``documents`` child starts beside its supervisor) writes them;
    ``note`` never blocks and never raises, as the edit hook must not. An event's
    ``actor_id`` is the window's last editor; its payload is ``document_id``, ``path``,
    ``editors`` (user ids, in the order they first edited in the window) and
    ``updates`` (how many updates all of them made).
    """

    def __init__(self, db: Database, publisher: EventPublisher, window: float) -> None:
        self._db = db
        self._publisher = publisher
        self._window = window
        self._gathered: dict[uuid.UUID, _Gathered] = {}  # by document id
        self._quiet_until: dict[uuid.UUID, float] = {}  # by document id: next event allowed
        self._wake = trio.Event()

    def note(self, user_id: uuid.UUID, ref: DocumentRef) -> None:
        """One stored update by ``user_id`` to the document ``ref`` (the edit hook)."""
        gathered = self._gathered.get(ref.id)
        if gathered is None:
            due = max(trio.current_time(), self._quiet_until.get(ref.id, -math.inf))
            gathered = self._gathered[ref.id] = _Gathered(ref, due)
            self._wake.set()
        gathered.editors[user_id] = gathered.editors.get(user_id, 0) + 1
        gathered.last_editor = user_id

    def pending(self) -> int:
        """How many documents have edits not logged yet."""
        return len(self._gathered)

    async def run(self) -> None:
        """Until cancelled: log each document's gathered edits once they are due. When
        cancelled (the process stopping), what is gathered is logged at once, for at most
        ``_LAST_WORDS_SECONDS``."""
        try:
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                due = [g for g in self._gathered.values() if g.due <= now]
                if due:
                    for gathered in due:
                        del self._gathered[gathered.ref.id]
                        self._quiet_until[gathered.ref.id] = now + self._window
                    await self._log(due)
                    continue
                for document_id in [d for d, at in self._quiet_until.items() if at <= now]:
                    del self._quiet_until[document_id]
                wake_at = min((g.due for g in self._gathered.values()), default=math.inf)
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
        finally:
            if self._gathered:
                last = list(self._gathered.values())
                self._gathered.clear()
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + _LAST_WORDS_SECONDS
                    await self._log(last)

    async def _log(self, due: list[_Gathered]) -> None:
        by_project: dict[uuid.UUID, list[NewEvent]] = defaultdict(list)
        for gathered in due:
            by_project[gathered.ref.project_id].append(
                NewEvent(
                    EventType.DOCUMENT_EDITED,
                    gathered.last_editor,
                    {
                        "document_id": str(gathered.ref.id),
                        "path": gathered.ref.path,
                        "editors": [str(user) for user in gathered.editors],
                        "updates": sum(gathered.editors.values()),
                    },
                )
            )
        for project_id, new in by_project.items():
            try:
                appended = await event_log.append(self._db, project_id, new)
            except (DatabaseUnavailable, ProjectNotFound) as error:
                log.warning("document activity of project %s not logged: %r", project_id, error)
                continue
            try:
                await self._publisher.publish(project_id, [event for event, _ in appended])
            except Exception:
                # Stored all the same: live clients read it from the log when they resume.
                log.exception("publishing document activity of project %s failed", project_id)


__all__ = ["DocumentActivity"]
