"""A project's live documents as a task reads them: from PostgreSQL, without their actors.

Every update any client received is stored before it was shared (``atrium.actors.document``),
so the snapshot plus the updates after it are the whole document. Building its text is
pycrdt's CPU work, done in a job worker process (``TaskContext.run_sync``).
"""

from __future__ import annotations

from typing import Any

import pycrdt

from ..core.timestamps import utc_iso
from ..persistence import documents as store
from ..persistence.documents import DocumentNotFound
from ._registry import TaskContext

# The name of a document's Y.Text: atrium.actors.document.TEXT (tasks do not import
# actors; tests/test_document_rest.py checks an export's text against the REST read).
TEXT = "content"


def document_text(updates: list[bytes]) -> str:
    """The text of the document that ``updates`` (a snapshot, then the updates after it)
    make. Top-level and pure, so a worker process can run it."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get(TEXT, type=pycrdt.Text)
    for update in updates:
        doc.apply_update(update)
    return str(text)


async def project_documents(ctx: TaskContext) -> list[dict[str, Any]]:
    """Each live document of the job's project, by path: ``id``, ``path``, ``seq``,
    ``updated_at`` and ``text``. A document deleted while this reads is left out."""
    assert ctx.project_id is not None
    found = []
    for row in await store.list_documents(ctx.db, ctx.project_id):
        try:
            loaded = await store.load_document(ctx.db, row.id)
        except DocumentNotFound:
            continue
        parts = [] if loaded.snapshot is None else [loaded.snapshot]
        parts += [update.update for update in loaded.updates]
        found.append(
            {
                "id": str(row.id),
                "path": row.path,
                "seq": loaded.row.last_seq,
                "updated_at": utc_iso(loaded.row.updated_at),
                "text": await ctx.run_sync(document_text, parts) if parts else "",
            }
        )
    return found
