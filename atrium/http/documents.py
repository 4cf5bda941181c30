"""``/api/v1/projects/{project_id}/documents``: tickets for live documents.

A live document is served over the y-websocket protocol at ``/ws/documents/{room}``
(docs/DOCUMENTS.md); a browser's WebSocket cannot send a bearer token, so a client first
gets a short-lived ticket here and passes it in the connection URL.
"""

from __future__ import annotations

import uuid

from quart import Blueprint, Response, g, request
from quart_schema import document_response, security_scheme, tag, validate_request

from ..domain.document_sessions import NotAMember, document_url
from ..identity.proxies import client_scheme
from .document_schemas import DocumentTicketRequest, DocumentTicketResponse
from .errors import ApiError
from .schemas import BY_ID, JSON_BODY, SIGNED_IN, error_responses, respond
from .security import require_user, services

blueprint = Blueprint("documents", __name__, url_prefix="/api/v1/projects")


def _project_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(422, "invalid_id", "The project id is not a valid UUID") from None


@blueprint.post("/<project_id>/documents/tickets")
@tag(["documents"])
@security_scheme([{"bearer": []}])
@document_response(DocumentTicketResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, *JSON_BODY)
@require_user
@validate_request(DocumentTicketRequest)
async def issue_ticket(project_id: str, data: DocumentTicketRequest) -> Response:
    """A ticket to open the live document at ``path`` (created if new) over y-websocket:
    ``new WebsocketProvider(url, room, doc, { params: { ticket } })``. Any member may
    have one (viewers read); it may open connections for ``expires_in`` seconds, so the
    provider's reconnects within that window need no new ticket."""
    svc = services()
    try:
        issued = await svc.document_sessions.issue_ticket(
            _project_id(project_id), g.user.id, g.claims.session_id, data.path
        )
    except NotAMember:
        raise ApiError(404, "project_not_found", "Project not found") from None
    scheme = client_scheme(
        request.remote_addr or "",
        request.scheme,
        request.headers.get("X-Forwarded-Proto"),
        svc.settings.trusted_proxies,
    )
    return respond(
        DocumentTicketResponse(
            ticket=issued.ticket,
            url=document_url(scheme, request.host),
            room=issued.room,
            expires_in=issued.expires_in,
        )
    )
