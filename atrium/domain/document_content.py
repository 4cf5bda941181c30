"""Live documents from REST: list them, read their text or Yjs state, write, delete.

Every call checks the caller's role in the project now (``atrium.core.roles``): any
member reads; owners and collaborators write (``EDIT_WORKSPACE``, as for FILE_CHANGE);
owners delete (``DELETE``, as for the project). A project the caller is not a member of
is refused exactly like a missing one, and a document of another project like a missing
document, so ids learn a stranger nothing.

Content goes through the document's actor, never around it: a read sees every update
any client has received (the actor shares nothing before it is stored), and a write is
a Yjs update made by the actor (``ReplaceText``: the smallest change at one place), so
it is stored, then broadcast, and merges with what live clients type meanwhile.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..actors import ActorStopped
from ..actors.document import DocumentTooLarge, ReadState, ReadText, ReplaceText
from ..core.roles import Action, Role, can
from ..persistence import documents as store
from ..persistence import projects
from ..persistence.database import Database
from ..persistence.documents import DocumentNotFound, DocumentRow
from .documents import Documents

# A document actor may stop between ``get`` and ``ask`` (idle, or reloading): ask anew.
_ATTEMPTS = 3
# A write waits behind whatever the actor has queued (a burst of updates, a compaction).
_ASK_SECONDS = 30.0


_FORBIDDEN = {
    Action.EDIT_WORKSPACE: "Viewers may read documents, not write them",
    Action.DELETE: "Only the project's owners may delete documents",
}


class DocumentRefused(Exception):
    """A refused document request, with a stable ``code``: project_not_found (not a
    member, or no such project), document_not_found, forbidden_role,
    document_too_large."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _project_not_found() -> DocumentRefused:
    return DocumentRefused("project_not_found", "No such project")


def _document_not_found() -> DocumentRefused:
    return DocumentRefused("document_not_found", "No such document")


class DocumentContent:
    """The live documents of one database pool, as members see them over REST."""

    def __init__(self, db: Database, documents: Documents) -> None:
        self._db = db
        self._documents = documents

    async def _role(self, project_id: uuid.UUID, user_id: uuid.UUID) -> Role:
        role = await projects.member_role(self._db, project_id, user_id)
        if role is None:
            raise _project_not_found()
        return role

    async def _require(self, project_id: uuid.UUID, user_id: uuid.UUID, action: Action) -> None:
        if not can(await self._role(project_id, user_id), action):
            raise DocumentRefused("forbidden_role", _FORBIDDEN[action])

    async def _row(self, project_id: uuid.UUID, document_id: uuid.UUID) -> DocumentRow:
        row = await self._documents.describe(document_id)
        if row is None or row.project_id != project_id:
            raise _document_not_found()
        return row

    async def _ask(self, document_id: uuid.UUID, message: Any) -> Any:
        left = _ATTEMPTS
        while True:
            left -= 1
            try:
                actor = await self._documents.get(document_id)
                return await actor.ask(message, timeout=_ASK_SECONDS)
            except ActorStopped:
                if not left:
                    raise
            except DocumentNotFound:
                raise _document_not_found() from None

    async def list(
        self,
        project_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        path: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[DocumentRow], int]:
        """One page of the project's documents by path, and how many it has (only the one
        at ``path`` when given); any member. Raises DocumentRefused (project_not_found),
        DatabaseUnavailable."""
        await self._role(project_id, user_id)
        if path is None:
            return await store.page_documents(self._db, project_id, limit=limit, offset=offset)
        row = await store.find_document_at(self._db, project_id, path)
        return ([], 0) if row is None else ([row], 1)

    async def describe(
        self, project_id: uuid.UUID, user_id: uuid.UUID, document_id: uuid.UUID
    ) -> DocumentRow:
        """One document's row (no content); any member. Raises DocumentRefused
        (project_not_found, document_not_found), DatabaseUnavailable."""
        await self._role(project_id, user_id)
        return await self._row(project_id, document_id)

    async def text(
        self, project_id: uuid.UUID, user_id: uuid.UUID, document_id: uuid.UUID
    ) -> tuple[DocumentRow, str]:
        """The document's row and its text (the ``Y.Text`` named ``content``); any
        member. Raises DocumentRefused, ActorStopped, AskTimeout, DatabaseUnavailable."""
        await self._role(project_id, user_id)
        row = await self._row(project_id, document_id)
        text: str = await self._ask(document_id, ReadText())
        return row, text

    async def state(
        self, project_id: uuid.UUID, user_id: uuid.UUID, document_id: uuid.UUID
    ) -> tuple[DocumentRow, bytes]:
        """The document's row and the whole document as one Yjs update (for
        ``Y.applyUpdate``); any member. Raises as ``text`` does."""
        await self._role(project_id, user_id)
        row = await self._row(project_id, document_id)
        state: bytes = await self._ask(document_id, ReadState())
        return row, state

    async def write(
        self, project_id: uuid.UUID, user_id: uuid.UUID, path: str, text: str
    ) -> tuple[DocumentRow, bool]:
        """Make the text of the document at ``path`` be ``text``, creating the document
        when there is none; owners and collaborators. Returns its row after the write and
        whether this call created it. Live clients receive the change as an update by
        ``user_id``. Raises DocumentRefused (project_not_found, forbidden_role,
        document_too_large: nothing was changed, and no document created), ActorStopped,
        AskTimeout, DatabaseUnavailable."""
        await self._require(project_id, user_id, Action.EDIT_WORKSPACE)
        if len(text.encode()) > self._documents.settings.max_document_bytes:
            # Too large for any document, new or not: refused before one is created.
            raise DocumentRefused(DocumentTooLarge.code, str(DocumentTooLarge()))
        existing = await store.find_document_at(self._db, project_id, path)
        try:
            ref = await self._documents.open(project_id, path, user_id)
        except DocumentNotFound:  # the project was deleted meanwhile
            raise _project_not_found() from None
        try:
            await self._ask(ref.id, ReplaceText(text, user_id))
        except DocumentTooLarge as error:
            raise DocumentRefused(error.code, str(error)) from None
        return await self._row(project_id, ref.id), existing is None

    async def delete(
        self, project_id: uuid.UUID, user_id: uuid.UUID, document_id: uuid.UUID
    ) -> None:
        """Delete the document and everything stored of it; owners only. Its live
        connections are closed with 4013 ``document_deleted``. Raises DocumentRefused
        (project_not_found, document_not_found, forbidden_role), DatabaseUnavailable."""
        await self._require(project_id, user_id, Action.DELETE)
        await self._row(project_id, document_id)
        if not await self._documents.delete(document_id):
            raise _document_not_found()


__all__ = ["DocumentContent", "DocumentRefused", "DocumentRow"]
