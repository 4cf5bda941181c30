"""``/api/v1/projects/{project_id}/documents``: live documents over REST.

List a project's documents, read one's text or its whole Yjs state, write a document's
text (created when its path has none), delete one. A document is named in URLs by its
id: the ``room`` a ticket answers (hex) or the same id as a UUID; a path, which may hold
slashes, goes in a body (writes, tickets) or the list's ``path`` query. The rules live in
``atrium.domain.document_content``: any member reads, owners and collaborators write,
owners delete; a project the caller is not a member of answers 404 project_not_found, as
a missing one does, and a document of another project 404 document_not_found.
"""

from __future__ import annotations

import uuid

from quart import Blueprint, Response, g
from quart_schema import (
    document_response,
    security_scheme,
    tag,
    validate_querystring,
    validate_request,
)

from ..actors import ActorStopped, AskTimeout
from ..domain.document_content import DocumentContent, DocumentRefused, DocumentRow
from .document_schemas import (
    DocumentListQuery,
    DocumentListResponse,
    DocumentResponse,
    DocumentTextResponse,
    DocumentWriteRequest,
)
from .errors import DATABASE_RETRY_AFTER, ApiError, error_response
from .schemas import (
    BY_ID,
    JSON_BODY,
    SIGNED_IN,
    binary_content,
    error_responses,
    no_content,
    respond,
)
from .security import require_user, services

blueprint = Blueprint("document_content", __name__, url_prefix="/api/v1/projects")

_STATUS = {
    "project_not_found": 404,
    "document_not_found": 404,
    "forbidden_role": 403,
    "document_too_large": 413,
}


@blueprint.errorhandler(DocumentRefused)
async def document_refused(error: DocumentRefused) -> Response:
    return error_response(_STATUS.get(error.code, 400), error.code, error.message)


@blueprint.errorhandler(ActorStopped)
@blueprint.errorhandler(AskTimeout)
async def document_unavailable(error: ActorStopped | AskTimeout) -> Response:
    # The document kept restarting or stayed busy: this request failed, the document did not.
    response = error_response(
        503, "document_unavailable", "The document is restarting or busy; retry shortly"
    )
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return response


def _id(value: str, what: str) -> uuid.UUID:
    """A path id (a UUID, with or without hyphens: a room is one without); 422 invalid_id."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(422, "invalid_id", f"The {what} id is not a valid UUID") from None


def _content() -> DocumentContent:
    return services().document_content


def _document(row: DocumentRow) -> DocumentResponse:
    return DocumentResponse(
        id=row.id,
        room=row.id.hex,
        project_id=row.project_id,
        path=row.path,
        size=row.byte_size,
        seq=row.last_seq,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_edited_by=row.last_edited_by,
    )


@blueprint.get("/<project_id>/documents")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@document_response(DocumentListResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
@validate_querystring(DocumentListQuery)
async def list_documents(project_id: str, query_args: DocumentListQuery) -> Response:
    """The project's live documents by path, without their content, one page at a time
    (any member); with ``path``, only the document there (none or one)."""
    pid = _id(project_id, "project")
    rows, total = await _content().list(
        pid, g.user.id, path=query_args.path, limit=query_args.limit, offset=query_args.offset
    )
    return respond(
        DocumentListResponse(
            project_id=pid,
            documents=[_document(r) for r in rows],
            total=total,
            limit=query_args.limit,
            offset=query_args.offset,
        )
    )


@blueprint.post("/<project_id>/documents")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@document_response(DocumentResponse, 201)
@document_response(DocumentResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, *JSON_BODY, 403)
@require_user
@validate_request(DocumentWriteRequest)
async def write_document(project_id: str, data: DocumentWriteRequest) -> Response:
    """Make the text of the document at ``path`` be ``text`` (owners and collaborators):
    201 when this created the document, 200 when it replaced an existing one's text.

    The change is a Yjs update made on the server (the smallest edit at one place): it is
    stored, then sent to the document's live clients, and merges with what they type
    meanwhile. Sending the same text again changes nothing. 403 ``forbidden_role`` for a
    viewer; 413 ``document_too_large`` when the document would pass DOC_MAX_BYTES (the
    text is then unchanged).
    """
    pid = _id(project_id, "project")
    row, created = await _content().write(pid, g.user.id, data.path, data.text)
    return respond(_document(row), 201 if created else 200)


@blueprint.get("/<project_id>/documents/<document_id>")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@document_response(DocumentResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def get_document(project_id: str, document_id: str) -> Response:
    """One live document, without its content (any member)."""
    row = await _content().describe(
        _id(project_id, "project"), g.user.id, _id(document_id, "document")
    )
    return respond(_document(row))


@blueprint.get("/<project_id>/documents/<document_id>/text")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@document_response(DocumentTextResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def get_document_text(project_id: str, document_id: str) -> Response:
    """The document's text: its ``Y.Text`` named ``content`` (any member), with every
    update any live client has received."""
    row, text = await _content().text(
        _id(project_id, "project"), g.user.id, _id(document_id, "document")
    )
    return respond(DocumentTextResponse(document=_document(row), text=text))


@blueprint.get("/<project_id>/documents/<document_id>/state")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@binary_content
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def get_document_state(project_id: str, document_id: str) -> Response:
    """The whole document as one Yjs update (``application/octet-stream``), for a Yjs
    client to ``Y.applyUpdate(doc, bytes)`` (any member)."""
    _, state = await _content().state(
        _id(project_id, "project"), g.user.id, _id(document_id, "document")
    )
    return Response(state, status=200, content_type="application/octet-stream")


@blueprint.delete("/<project_id>/documents/<document_id>")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@no_content
@error_responses(*SIGNED_IN, *BY_ID, 403)
@require_user
async def delete_document(project_id: str, document_id: str) -> Response:
    """Delete the document and everything stored of it (owners only): 204. Its live
    connections are closed with 4013 ``document_deleted``."""
    await _content().delete(_id(project_id, "project"), g.user.id, _id(document_id, "document"))
    return Response(b"", status=204)
