"""``WS /ws/{project_id}[/{user_id}]`` and ``WS /ws/documents/{room}`` on the main port (ASGI),
and the workspace status."""

from __future__ import annotations

import uuid

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Blueprint, Response, g
from quart_schema import document_response, security_scheme, tag

from ..domain.document_sessions import DocumentHandshake, DocumentSessions
from ..domain.realtime import ConnectionGone, Handshake, Realtime
from .errors import ApiError
from .json import error_body
from .schemas import BY_ID, SIGNED_IN, WorkspaceStatusResponse, error_responses, respond
from .security import require_user, services

blueprint = Blueprint("ws", __name__)


class AsgiConnection:
    """A live connection's ``Connection`` over the server's ASGI WebSocket events."""

    __slots__ = ("_receive", "_send")

    def __init__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self._receive = receive
        self._send = send

    async def receive(self) -> str | bytes:
        event = await self._receive()
        if event["type"] == "websocket.receive":
            text = event.get("text")
            return text if text is not None else (event.get("bytes") or b"")
        raise ConnectionGone()  # websocket.disconnect

    # hypercorn never raises on a send: what is sent after the client went away is
    # dropped, and the receive side reports the disconnect.

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text, "bytes": None})

    async def send_bytes(self, data: bytes) -> None:
        await self._send({"type": "websocket.send", "text": None, "bytes": data})

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def flush(self) -> None:
        """Nothing is ever owed: this transport has no direct write."""


class WorkspaceSockets:
    """``WS /ws/{project_id}[/{user_id}]`` (workspaces, ``Realtime``) and
    ``WS /ws/documents/{room}`` (live documents, ``DocumentSessions``) on the main port,
    as a plain ASGI application.

    The Edge layer hands every WebSocket scope here, past Quart: Quart's WebSocket
    machinery (two more tasks, a channel and a request context per connection) cost a
    third of each idle connection's memory and of each delivery's CPU, and did nothing
    the live connection does not do itself.
    """

    def __init__(self, realtime: Realtime, documents: DocumentSessions | None = None) -> None:
        self._realtime = realtime
        self._documents = documents

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        assert scope["type"] == "websocket"
        path, query = scope["path"], scope["query_string"].decode("latin-1")
        documents = self._documents
        if documents is not None:
            document = DocumentHandshake.parse(path, query, scope["headers"])
            if document is not None:
                await self._serve_document(documents, document, receive, send)
                return
        handshake = Handshake.parse(path, query, scope["headers"])
        realtime = self._realtime
        if handshake is None:
            await _reject(send, 404, "not_found", "No WebSocket endpoint at this path")
            return
        # The connection's failure boundary before its own (Realtime.serve):
        # hypercorn answers a handshake its application abandoned with a 500.
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        except Exception as error:
            context = {"transport": "main", "project_id": handshake.project_id[:64]}
            realtime.failures.record("connection", error, context)
            return
        await realtime.serve(AsgiConnection(receive, send), handshake, transport="main")

    @staticmethod
    async def _serve_document(
        documents: DocumentSessions,
        handshake: DocumentHandshake,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        except Exception as error:
            context = {"transport": "main", "room": handshake.room}
            documents.failures.record("connection", error, context)
            return
        await documents.serve(AsgiConnection(receive, send), handshake, transport="main")


async def _reject(send: ASGISendCallable, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP response in the error shape."""
    body = error_body(code, message)
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


@blueprint.get("/api/v1/projects/<project_id>/workspace/status")
@tag(["workspaces"])
@security_scheme([{"bearer": []}])
@document_response(WorkspaceStatusResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def workspace_status(project_id: str) -> Response:
    """Who is in the project's live workspace now (seed fields), from its actor."""
    try:
        pid = uuid.UUID(project_id)
    except ValueError:
        raise ApiError(422, "invalid_id", "project_id is not a valid UUID") from None
    svc = services()
    if await svc.projects.role(pid, g.user.id) is None:
        raise ApiError(404, "project_not_found", "Project not found")
    status = await svc.workspaces.status(pid)
    return respond(WorkspaceStatusResponse.model_validate(status))
