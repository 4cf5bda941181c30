"""``WS /ws/{project_id}[/{user_id}]`` on the main port: the Quart-Trio transport adapter."""

from __future__ import annotations

import uuid

from quart import Blueprint, Response, g, websocket
from quart.wrappers import Websocket
from quart_schema import document_response, security_scheme, tag

from ..actors import ActorStopped
from ..actors.workspace import Status
from ..persistence import projects
from ..persistence import workspace as workspace_store
from ..session import ConnectionGone, Handshake
from .errors import ApiError
from .json import json_response
from .schemas import ErrorResponse, WorkspaceStatusResponse
from .security import require_user, services

blueprint = Blueprint("ws", __name__)


class QuartConnection:
    """The session's ``Connection`` over Quart's websocket context."""

    __slots__ = ("_ws",)

    def __init__(self) -> None:
        # The object behind the context-local proxy, looked up once, not on every send.
        self._ws: Websocket = websocket._get_current_object()  # type: ignore[attr-defined]

    async def receive(self) -> str | bytes:
        # Quart cancels the handler when the client disconnects; a failed receive is the
        # same news by another route.
        try:
            return await self._ws.receive()
        except Exception as error:
            raise ConnectionGone() from error

    async def send(self, text: str) -> None:
        try:
            await self._ws.send(text)
        except Exception as error:
            raise ConnectionGone() from error

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.close(code, reason)
        except Exception:  # already gone: nothing left to close
            return

    async def flush(self) -> None:
        """Nothing is ever owed: this transport has no direct write."""


async def _serve(project_id: str, user_id: str | None) -> None:
    await websocket.accept()
    handshake = Handshake(
        project_id=project_id,
        path_user_id=user_id,
        query={k: v for k, v in websocket.args.items()},
        headers={k.lower(): v for k, v in websocket.headers.items()},
    )
    realtime = services().realtime
    assert realtime is not None, "the WebSocket route needs the workspace runtime"
    await realtime.serve(QuartConnection(), handshake)


@blueprint.websocket("/ws/<project_id>")
async def workspace(project_id: str) -> None:
    """The live workspace of a project (see README: WebSocket protocol)."""
    await _serve(project_id, None)


@blueprint.websocket("/ws/<project_id>/<user_id>")
async def workspace_as(project_id: str, user_id: str) -> None:
    """The seed's URL form: ``user_id`` must be the token's subject."""
    await _serve(project_id, user_id)


@blueprint.get("/api/v1/projects/<project_id>/workspace/status")
@tag(["workspaces"])
@security_scheme([{"bearer": []}])
@document_response(WorkspaceStatusResponse, 200)
@document_response(ErrorResponse, 404)
@require_user
async def workspace_status(project_id: str) -> Response:
    """Who is in the project's live workspace now (seed fields), from its actor."""
    try:
        pid = uuid.UUID(project_id)
    except ValueError:
        raise ApiError(422, "invalid_id", "project_id is not a valid UUID") from None
    svc = services()
    if await projects.member_role(svc.db, pid, g.user.id) is None:
        raise ApiError(404, "project_not_found", "Project not found")
    actor = None if svc.realtime is None else svc.realtime.workspaces.find(pid)
    if actor is not None:
        try:
            return json_response(await actor.ask(Status(), timeout=5.0))
        except ActorStopped:
            pass  # stopped between find and ask: it has nobody online
    return json_response(
        {
            "project_id": pid,
            "active_collaborators": 0,
            "connections": 0,
            "online_users": [],
            "workspace_url": f"/ws/{pid}",
            "real_time_events": 0,
            "seq": await workspace_store.last_seq(svc.db, pid),
        }
    )
