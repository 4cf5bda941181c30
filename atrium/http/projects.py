"""``/api/v1/projects``: projects, their collaborators and roles, and the event log.

Access rules (``atrium.core.roles``) are checked in the persistence layer under the project's
row lock. A project the caller is not a member of answers exactly like one that does not
exist (404 project_not_found); a member whose role forbids an action gets 403
forbidden_role. The handlers translate HTTP to calls of the project service
(``atrium.domain.projects``), which invalidates caches and publishes events after each
committed change.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from quart import Blueprint, Response, g
from quart_schema import (
    document_response,
    security_scheme,
    tag,
    validate_querystring,
    validate_request,
)

from ..core.projects import (
    AlreadyMember,
    LastOwner,
    Member,
    MemberNotFound,
    Project,
    ProjectError,
    ProjectNotFound,
    RoleForbidden,
    UserNotFound,
)
from ..core.timestamps import utc_iso, utc_iso_at
from ..domain.accounts import User
from ..domain.services import Services
from .errors import ApiError, error_response
from .json import json_response
from .schemas import (
    BY_ID,
    JSON_BODY,
    SIGNED_IN,
    Collaboration,
    CollaboratorAddedResponse,
    CollaboratorAddRequest,
    CollaboratorListResponse,
    CollaboratorResponse,
    EventListQuery,
    EventListResponse,
    ProjectCreateRequest,
    ProjectListQuery,
    ProjectListResponse,
    ProjectResponse,
    ProjectUpdateRequest,
    RoleChangeRequest,
    Visibility,
    error_responses,
    no_content,
    respond,
)
from .security import require_user, services

blueprint = Blueprint("projects", __name__, url_prefix="/api/v1/projects")

_STATUS: dict[type[ProjectError], int] = {
    ProjectNotFound: 404,
    UserNotFound: 404,
    MemberNotFound: 404,
    RoleForbidden: 403,
    LastOwner: 409,
    AlreadyMember: 409,
}


@blueprint.errorhandler(ProjectError)
async def project_error(error: ProjectError) -> Response:
    return error_response(_STATUS.get(type(error), 400), error.code, error.message)


def _id(value: str, what: str) -> uuid.UUID:
    """Parse a path id; 422 invalid_id (not a 404 or a 500) when it is not a UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(422, "invalid_id", f"The {what} id is not a valid UUID") from None


def _project(project: Project) -> ProjectResponse:
    return ProjectResponse(
        id=project.id,
        name=project.name,
        description=project.description,
        visibility=cast(Visibility, project.visibility),  # checked by the model
        owner_id=project.owner_id,
        created_at=project.created_at,
        updated_at=project.updated_at,
        collaborator_count=project.collaborator_count,
        status="active",
        role=project.role,
        workspace_url=f"/ws/{project.id}",
    )


def _project_json(project: Project) -> dict[str, Any]:
    """``_project(project)`` as plain JSON values (``model_dump(mode="json")``), built
    directly: a list page holds up to 100 of them, and the model's validation and dump
    cost several times the dict (tests/test_projects.py checks the two agree). This dict
    is also what the project-list cache stores."""
    return {
        "id": str(project.id),
        "name": project.name,
        "description": project.description,
        "visibility": project.visibility,
        "owner_id": str(project.owner_id),
        "created_at": utc_iso(project.created_at),
        "updated_at": utc_iso(project.updated_at),
        "collaborator_count": project.collaborator_count,
        "status": "active",
        "role": project.role.value,
        "workspace_url": f"/ws/{project.id}",
    }


def _member(member: Member) -> CollaboratorResponse:
    return CollaboratorResponse(
        user_id=member.user_id,
        email=member.email,
        role=member.role,
        invited_at=member.invited_at,
        invited_by=member.invited_by,
    )


@blueprint.get("/")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(ProjectListResponse, 200)
@error_responses(*SIGNED_IN, 422)
@require_user
@validate_querystring(ProjectListQuery)
async def list_projects(query_args: ProjectListQuery) -> Response:
    """The caller's live projects (owned or shared), newest first, one page at a time.

    Pages are cached per user for PROJECT_CACHE_TTL_SECONDS (0 disables it); every write
    that changes what a user would see drops that user's pages, so a read after a write
    is never stale. A page that expires under load is read once: concurrent requests for
    it wait for that read. ``cached`` and ``cache_expires_at`` say whether this page came
    from the cache and when that entry expires.
    """
    return json_response(await list_page(services(), g.user, query_args))


async def list_page(svc: Services, user: User, query: ProjectListQuery) -> dict[str, Any]:
    """What ``GET /`` answers for ``query`` (also served past Quart: ``hot.py``)."""
    limit, offset = query.limit, query.offset
    key = f"list:{limit}:{offset}"

    async def fill() -> dict[str, Any]:
        found = await svc.projects.page(user.id, limit=limit, offset=offset)
        return {"projects": [_project_json(p) for p in found.projects], "total": found.total}

    filled = await svc.project_cache.get_or_fill(user.id, key, fill)
    page, hit = filled.value, filled.hit
    cached = hit is not None
    (svc.metrics.cache_hits if cached else svc.metrics.cache_misses).inc()
    expires = None if hit is None else utc_iso_at(hit.expires_at)
    return {
        "projects": page["projects"],
        "total": page["total"],
        "limit": limit,
        "offset": offset,
        "cached": cached,
        "cache_expires_at": expires,
    }


@blueprint.post("/")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(ProjectResponse, 201)
@error_responses(*SIGNED_IN, *JSON_BODY)
@require_user
@validate_request(ProjectCreateRequest)
async def create_project(data: ProjectCreateRequest) -> Response:
    """Create a project; the caller becomes its owner. Logs PROJECT_CREATED."""
    project = await services().projects.create(
        g.user.id, name=data.name, description=data.description, visibility=data.visibility
    )
    return respond(_project(project), 201)


@blueprint.get("/<project_id>")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(ProjectResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def get_project(project_id: str) -> Response:
    """One project the caller is a member of (any role)."""
    project = await services().projects.get(_id(project_id, "project"), g.user.id)
    return respond(_project(project))


@blueprint.patch("/<project_id>")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(ProjectResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, *JSON_BODY, 403)
@require_user
@validate_request(ProjectUpdateRequest)
async def update_project(project_id: str, data: ProjectUpdateRequest) -> Response:
    """Change name and description (owners, collaborators) or visibility (owners only).

    Logs PROJECT_UPDATED when something actually changed.
    """
    pid = _id(project_id, "project")
    changes = {name: getattr(data, name) for name in data.model_fields_set}
    project = await services().projects.update(pid, g.user.id, changes)
    return respond(_project(project))


@blueprint.delete("/<project_id>")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@no_content
@error_responses(*SIGNED_IN, *BY_ID, 403)
@require_user
async def delete_project(project_id: str) -> Response:
    """Delete the project (owners only): 204, then 404 for every API. Logs PROJECT_DELETED."""
    pid = _id(project_id, "project")
    await services().projects.delete(pid, g.user.id)
    return Response(b"", status=204)


@blueprint.post("/<project_id>/collaborators")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(CollaboratorAddedResponse, 201)
@error_responses(*SIGNED_IN, *BY_ID, *JSON_BODY, 403, 409)
@require_user
@validate_request(CollaboratorAddRequest)
async def add_collaborator(project_id: str, data: CollaboratorAddRequest) -> Response:
    """Add a user (by ``user_id`` or ``email``) with a role (owners only). Logs MEMBER_ADDED.

    404 user_not_found for an unknown user, 409 already_member for a member.
    """
    pid = _id(project_id, "project")
    member = await services().projects.add_member(
        pid, g.user.id, role=data.role, user_id=data.user_id, email=data.email
    )
    collaboration = Collaboration(
        user_id=member.user_id,
        project_id=member.project_id,
        role=member.role,
        invited_at=member.invited_at,
        invited_by=member.invited_by,
    )
    return respond(
        CollaboratorAddedResponse(
            message="Collaborator added successfully", collaboration=collaboration
        ),
        201,
    )


@blueprint.get("/<project_id>/collaborators")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(CollaboratorListResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def list_collaborators(project_id: str) -> Response:
    """Every member with their role, owners included (any member may read it)."""
    pid = _id(project_id, "project")
    members = await services().projects.members(pid, g.user.id)
    return respond(
        CollaboratorListResponse(
            project_id=pid, collaborators=[_member(m) for m in members], total=len(members)
        )
    )


@blueprint.patch("/<project_id>/collaborators/<user_id>")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(CollaboratorResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, *JSON_BODY, 403, 409)
@require_user
@validate_request(RoleChangeRequest)
async def change_role(project_id: str, user_id: str, data: RoleChangeRequest) -> Response:
    """Change a member's role (owners only); 409 last_owner if no owner would remain.

    Logs MEMBER_ROLE_CHANGED when the role actually changed.
    """
    pid, uid = _id(project_id, "project"), _id(user_id, "user")
    member = await services().projects.change_role(pid, g.user.id, uid, data.role)
    return respond(_member(member))


@blueprint.delete("/<project_id>/collaborators/<user_id>")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@no_content
@error_responses(*SIGNED_IN, *BY_ID, 403, 409)
@require_user
async def remove_collaborator(project_id: str, user_id: str) -> Response:
    """Remove a member: owners remove anyone, any member themself. 204; logs MEMBER_REMOVED.

    409 last_owner for the project's only owner.
    """
    pid, uid = _id(project_id, "project"), _id(user_id, "user")
    await services().projects.remove_member(pid, g.user.id, uid)
    return Response(b"", status=204)


@blueprint.get("/<project_id>/events")
@tag(["projects"])
@security_scheme([{"bearer": []}])
@document_response(EventListResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
@validate_querystring(EventListQuery)
async def list_events(project_id: str, query_args: EventListQuery) -> Response:
    """The project's event log after ``since_seq``, in seq order (any member).

    Seqs are gapless per project; read on with ``since_seq=next_seq`` while ``has_more``.
    ``truncated``: events after ``since_seq`` were pruned by retention (the log now starts
    at ``oldest_seq``; reload the state rather than replay).
    """
    pid = _id(project_id, "project")
    page = await services().projects.events(
        pid, g.user.id, since_seq=query_args.since_seq, limit=query_args.limit
    )
    next_seq = page.events[-1].seq if page.events else query_args.since_seq
    return json_response(
        {
            "project_id": pid,
            "events": page.events,
            "next_seq": next_seq,
            "last_seq": page.last_seq,
            "has_more": next_seq < page.last_seq,
            "oldest_seq": page.oldest_seq,
            "truncated": query_args.since_seq + 1 < (page.oldest_seq or page.last_seq + 1),
        }
    )
