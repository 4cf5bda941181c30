"""Projects and their members.

Every write runs in one transaction that first locks the project row, checks the acting
member's role against ``atrium.core.roles`` under that lock, makes the change and appends its
event to the project's log with ``events.append_event``. Writers to one project are
therefore serialised: a check such as "is this the last owner?" cannot be invalidated by a
concurrent change.

A project that is not found, is deleted, or of which the actor is not a member raises the
same ``ProjectNotFound``: callers must not learn that someone else's project exists.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg

from ..core.emails import email_key
from ..core.events import Event, EventType
from ..core.projects import AlreadyMember as AlreadyMember
from ..core.projects import LastOwner as LastOwner
from ..core.projects import Member as Member
from ..core.projects import MemberNotFound as MemberNotFound
from ..core.projects import Project as Project
from ..core.projects import ProjectError as ProjectError
from ..core.projects import ProjectNotFound as ProjectNotFound
from ..core.projects import ProjectPage as ProjectPage
from ..core.projects import RoleForbidden as RoleForbidden
from ..core.projects import UserNotFound as UserNotFound
from ..core.roles import Action, Role, can
from .database import Database
from .events import append_event

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """The outcome of a committed write.

    ``events`` were appended in its transaction (publish them now); ``audience`` holds
    every user whose view of their projects may have changed (invalidate their caches).
    """

    value: T
    events: list[Event] = field(default_factory=list)
    audience: frozenset[uuid.UUID] = frozenset()


_PROJECT_COLUMNS = (
    "p.id, p.name, p.description, p.visibility, p.owner_id, p.created_at, p.updated_at,"
    " (SELECT count(*) FROM project_members c WHERE c.project_id = p.id) AS collaborator_count"
)


def _project(row: asyncpg.Record, role: str | None = None) -> Project:
    return Project(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        visibility=row["visibility"],
        owner_id=row["owner_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        collaborator_count=row["collaborator_count"],
        role=Role(role or row["role"]),
    )


def _member(row: asyncpg.Record, project_id: uuid.UUID) -> Member:
    return Member(
        user_id=row["user_id"],
        project_id=project_id,
        email=row["email"],
        role=Role(row["role"]),
        invited_at=row["invited_at"],
        invited_by=row["invited_by"],
    )


async def _lock(
    conn: asyncpg.Connection, project_id: uuid.UUID, actor_id: uuid.UUID
) -> tuple[asyncpg.Record, Role]:
    """Lock a live project's row and return it with the actor's role.

    Locking (not merely reading) keeps every role check valid until commit. Raises
    ``ProjectNotFound`` when the project is missing, deleted or not the actor's.
    """
    row = await conn.fetchrow(
        "SELECT p.id, p.name, p.description, p.visibility, p.owner_id, m.role"
        " FROM projects p LEFT JOIN project_members m"
        " ON m.project_id = p.id AND m.user_id = $2"
        " WHERE p.id = $1 AND p.deleted_at IS NULL FOR NO KEY UPDATE OF p",
        project_id,
        actor_id,
    )
    if row is None or row["role"] is None:
        raise ProjectNotFound()
    return row, Role(row["role"])


def _require(role: Role, action: Action, what: str) -> None:
    if not can(role, action):
        raise RoleForbidden(f"A {role} may not {what}")


async def _member_ids(conn: asyncpg.Connection, project_id: uuid.UUID) -> frozenset[uuid.UUID]:
    rows = await conn.fetch("SELECT user_id FROM project_members WHERE project_id = $1", project_id)
    return frozenset(r["user_id"] for r in rows)


async def _fetch_project(conn: asyncpg.Connection, project_id: uuid.UUID, role: Role) -> Project:
    row = await conn.fetchrow(
        f"SELECT {_PROJECT_COLUMNS} FROM projects p WHERE p.id = $1", project_id
    )
    assert row is not None  # locked by the caller's transaction
    return _project(row, role)


async def _owner_count(conn: asyncpg.Connection, project_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM project_members WHERE project_id = $1 AND role = 'owner'",
            project_id,
        )
    )


async def _reassign_primary_owner(
    conn: asyncpg.Connection, project_id: uuid.UUID, former: uuid.UUID
) -> None:
    """If ``former`` was the primary owner, hand ``owner_id`` to the longest-standing owner."""
    await conn.execute(
        "UPDATE projects SET owner_id = ("
        "  SELECT user_id FROM project_members WHERE project_id = $1 AND role = 'owner'"
        "  ORDER BY invited_at, user_id LIMIT 1)"
        " WHERE id = $1 AND owner_id = $2",
        project_id,
        former,
    )


async def _find_member(
    conn: asyncpg.Connection, project_id: uuid.UUID, user_id: uuid.UUID
) -> Member | None:
    row = await conn.fetchrow(
        "SELECT m.user_id, u.email, m.role, m.invited_at, m.invited_by"
        " FROM project_members m JOIN users u ON u.id = m.user_id"
        " WHERE m.project_id = $1 AND m.user_id = $2",
        project_id,
        user_id,
    )
    return None if row is None else _member(row, project_id)


async def create_project(
    db: Database,
    owner_id: uuid.UUID,
    *,
    name: str,
    description: str | None,
    visibility: str,
) -> Change[Project]:
    """Create a project owned by ``owner_id`` (its first member) and log PROJECT_CREATED."""
    project_id = uuid.uuid4()

    async def create(conn: asyncpg.Connection) -> Change[Project]:
        await conn.execute(
            "INSERT INTO projects (id, name, description, visibility, owner_id)"
            " VALUES ($1, $2, $3, $4, $5)",
            project_id,
            name,
            description,
            visibility,
            owner_id,
        )
        await conn.execute(
            "INSERT INTO project_members (project_id, user_id, role, invited_at)"
            " SELECT id, owner_id, 'owner', created_at FROM projects WHERE id = $1",
            project_id,
        )
        event = await append_event(
            conn,
            project_id,
            EventType.PROJECT_CREATED,
            owner_id,
            {"name": name, "description": description, "visibility": visibility},
        )
        project = await _fetch_project(conn, project_id, Role.OWNER)
        return Change(project, [event], frozenset({owner_id}))

    return await db.transaction(create)


async def list_projects(
    db: Database, user_id: uuid.UUID, *, limit: int, offset: int
) -> ProjectPage:
    """One page of the live projects ``user_id`` is a member of, newest first, and the total."""
    rows = await db.fetch(
        "WITH mine AS ("
        "  SELECT m.project_id, m.role, p.created_at FROM project_members m"
        "  JOIN projects p ON p.id = m.project_id"
        "  WHERE m.user_id = $1 AND p.deleted_at IS NULL)"
        " SELECT t.total, page.* FROM (SELECT count(*) AS total FROM mine) t"
        " LEFT JOIN LATERAL ("
        f"  SELECT {_PROJECT_COLUMNS}, mine.role FROM mine"
        "   JOIN projects p ON p.id = mine.project_id"
        "   ORDER BY mine.created_at DESC, mine.project_id LIMIT $2 OFFSET $3) page ON true",
        user_id,
        limit,
        offset,
    )
    total = int(rows[0]["total"])
    return ProjectPage([_project(r) for r in rows if r["id"] is not None], total)


async def get_project(db: Database, project_id: uuid.UUID, user_id: uuid.UUID) -> Project:
    """The live project as member ``user_id`` sees it; ``ProjectNotFound`` otherwise."""
    row = await db.fetchrow(
        f"SELECT {_PROJECT_COLUMNS}, m.role FROM projects p"
        " JOIN project_members m ON m.project_id = p.id AND m.user_id = $2"
        " WHERE p.id = $1 AND p.deleted_at IS NULL",
        project_id,
        user_id,
    )
    if row is None:
        raise ProjectNotFound()
    return _project(row)


async def member_role(
    db: Database | asyncpg.Connection, project_id: uuid.UUID, user_id: uuid.UUID
) -> Role | None:
    """``user_id``'s role in the live project, or None (not a member, missing or deleted)."""
    role = await db.fetchval(
        "SELECT m.role FROM project_members m JOIN projects p ON p.id = m.project_id"
        " WHERE m.project_id = $1 AND m.user_id = $2 AND p.deleted_at IS NULL",
        project_id,
        user_id,
    )
    return None if role is None else Role(role)


async def session_member_role(
    db: Database, project_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID
) -> tuple[bool, Role | None]:
    """Whether ``session_id`` is the user's live (not revoked) login session, and the
    user's role in the live project (``member_role``): what a joining connection checks.

    Read when asked, never cached: the checks of joins that arrive together go in one
    round trip (``Database.batcher``), sent once the one before it returned. Raises
    DatabaseUnavailable (for every join of the batch)."""
    return await db.batcher(_session_member_roles).call((project_id, user_id, session_id))


async def _session_member_roles(
    db: Database, asked: Sequence[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]
) -> list[tuple[bool, Role | None]]:
    """``session_member_role`` for each (project, user, session), in one statement."""
    rows = await db.fetch(
        "SELECT q.n, EXISTS (SELECT 1 FROM sessions s"
        "  WHERE s.id = q.session_id AND s.user_id = q.user_id AND s.revoked_at IS NULL)"
        "  AS live,"
        " (SELECT m.role FROM project_members m JOIN projects p ON p.id = m.project_id"
        "  WHERE m.project_id = q.project_id AND m.user_id = q.user_id"
        "  AND p.deleted_at IS NULL) AS role"
        " FROM unnest($1::uuid[], $2::uuid[], $3::uuid[])"
        " WITH ORDINALITY AS q(project_id, user_id, session_id, n)",
        [a[0] for a in asked],
        [a[1] for a in asked],
        [a[2] for a in asked],
    )
    answers: list[tuple[bool, Role | None]] = [(False, None)] * len(asked)
    for row in rows:
        role = row["role"]
        answers[int(row["n"]) - 1] = (bool(row["live"]), None if role is None else Role(role))
    return answers


_EDITABLE = {
    "name": Action.EDIT_DETAILS,
    "description": Action.EDIT_DETAILS,
    "visibility": Action.CHANGE_VISIBILITY,
}


async def update_project(
    db: Database, project_id: uuid.UUID, actor_id: uuid.UUID, changes: Mapping[str, Any]
) -> Change[Project]:
    """Apply ``changes`` (any of name, description, visibility) and log PROJECT_UPDATED.

    Every named field must be allowed to the actor's role (else ``RoleForbidden``, and
    nothing changes). Values equal to the current ones change nothing and log nothing.
    """
    unknown = set(changes) - set(_EDITABLE)
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")

    async def update(conn: asyncpg.Connection) -> Change[Project]:
        row, role = await _lock(conn, project_id, actor_id)
        for name in changes:
            _require(role, _EDITABLE[name], f"change the project's {name}")
        changed = {k: v for k, v in changes.items() if row[k] != v}
        if not changed:
            return Change(await _fetch_project(conn, project_id, role))
        merged = {k: changed.get(k, row[k]) for k in _EDITABLE}
        await conn.execute(
            "UPDATE projects SET name = $2, description = $3, visibility = $4, updated_at = now()"
            " WHERE id = $1",
            project_id,
            merged["name"],
            merged["description"],
            merged["visibility"],
        )
        event = await append_event(
            conn,
            project_id,
            EventType.PROJECT_UPDATED,
            actor_id,
            {"changes": changed, "previous": {k: row[k] for k in changed}},
        )
        project = await _fetch_project(conn, project_id, role)
        return Change(project, [event], await _member_ids(conn, project_id))

    return await db.transaction(update)


async def delete_project(db: Database, project_id: uuid.UUID, actor_id: uuid.UUID) -> Change[None]:
    """Soft-delete the project (owners only) after logging PROJECT_DELETED.

    From then on it is ``ProjectNotFound`` for everyone; its members and log are kept.
    """

    async def delete(conn: asyncpg.Connection) -> Change[None]:
        _, role = await _lock(conn, project_id, actor_id)
        _require(role, Action.DELETE, "delete the project")
        event = await append_event(conn, project_id, EventType.PROJECT_DELETED, actor_id, {})
        await conn.execute(
            "UPDATE projects SET deleted_at = now(), updated_at = now() WHERE id = $1", project_id
        )
        return Change(None, [event], await _member_ids(conn, project_id))

    return await db.transaction(delete)


async def add_member(
    db: Database,
    project_id: uuid.UUID,
    actor_id: uuid.UUID,
    *,
    role: Role,
    user_id: uuid.UUID | None = None,
    email: str | None = None,
) -> Change[Member]:
    """Add the user given by ``user_id`` or ``email`` with ``role``; log MEMBER_ADDED.

    Raises ``RoleForbidden`` (actor may not manage members), ``UserNotFound`` and
    ``AlreadyMember``.
    """
    if (user_id is None) == (email is None):
        raise ValueError("give exactly one of user_id and email")
    key = None if email is None else email_key(email)

    async def add(conn: asyncpg.Connection) -> Change[Member]:
        _, actor_role = await _lock(conn, project_id, actor_id)
        _require(actor_role, Action.MANAGE_MEMBERS, "add members")
        if user_id is not None:
            target = await conn.fetchval("SELECT id FROM users WHERE id = $1", user_id)
        else:
            target = await conn.fetchval("SELECT id FROM users WHERE email_normalised = $1", key)
        if target is None:
            raise UserNotFound()
        inserted = await conn.fetchval(
            "INSERT INTO project_members (project_id, user_id, role, invited_by)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING user_id",
            project_id,
            target,
            role.value,
            actor_id,
        )
        if inserted is None:
            raise AlreadyMember()
        event = await append_event(
            conn,
            project_id,
            EventType.MEMBER_ADDED,
            actor_id,
            {"user_id": target, "role": role.value},
        )
        member = await _find_member(conn, project_id, target)
        assert member is not None
        return Change(member, [event], await _member_ids(conn, project_id))

    return await db.transaction(add)


async def list_members(db: Database, project_id: uuid.UUID, user_id: uuid.UUID) -> list[Member]:
    """Every member of the live project, longest-standing first, for member ``user_id``."""
    rows = await db.fetch(
        "SELECT m.user_id, u.email, m.role, m.invited_at, m.invited_by"
        " FROM project_members m JOIN users u ON u.id = m.user_id"
        " WHERE m.project_id = $1 AND EXISTS ("
        "  SELECT 1 FROM project_members me JOIN projects p ON p.id = me.project_id"
        "  WHERE me.project_id = $1 AND me.user_id = $2 AND p.deleted_at IS NULL)"
        " ORDER BY m.invited_at, m.user_id",
        project_id,
        user_id,
    )
    if not rows:  # a live project always has at least its owner
        raise ProjectNotFound()
    return [_member(r, project_id) for r in rows]


async def change_role(
    db: Database, project_id: uuid.UUID, actor_id: uuid.UUID, user_id: uuid.UUID, role: Role
) -> Change[Member]:
    """Give member ``user_id`` the ``role`` (owners only); log MEMBER_ROLE_CHANGED.

    Raises ``RoleForbidden``, ``MemberNotFound``, and ``LastOwner`` when this would leave
    the project without an owner. The same role again changes and logs nothing.
    """

    async def change(conn: asyncpg.Connection) -> Change[Member]:
        _, actor_role = await _lock(conn, project_id, actor_id)
        _require(actor_role, Action.MANAGE_MEMBERS, "change roles")
        member = await _find_member(conn, project_id, user_id)
        if member is None:
            raise MemberNotFound()
        if member.role == role:
            return Change(member)
        if member.role == Role.OWNER and await _owner_count(conn, project_id) == 1:
            raise LastOwner()
        await conn.execute(
            "UPDATE project_members SET role = $3 WHERE project_id = $1 AND user_id = $2",
            project_id,
            user_id,
            role.value,
        )
        if member.role == Role.OWNER:
            await _reassign_primary_owner(conn, project_id, user_id)
        event = await append_event(
            conn,
            project_id,
            EventType.MEMBER_ROLE_CHANGED,
            actor_id,
            {"user_id": user_id, "role": role.value, "previous_role": member.role.value},
        )
        updated = await _find_member(conn, project_id, user_id)
        assert updated is not None
        return Change(updated, [event], await _member_ids(conn, project_id))

    return await db.transaction(change)


async def remove_member(
    db: Database, project_id: uuid.UUID, actor_id: uuid.UUID, user_id: uuid.UUID
) -> Change[None]:
    """Remove member ``user_id`` (owners remove anyone, any member themself); log it.

    Raises ``RoleForbidden``, ``MemberNotFound`` and ``LastOwner`` (the sole owner cannot
    leave or be removed).
    """

    async def remove(conn: asyncpg.Connection) -> Change[None]:
        _, actor_role = await _lock(conn, project_id, actor_id)
        if user_id == actor_id:
            _require(actor_role, Action.LEAVE, "leave the project")
        else:
            _require(actor_role, Action.MANAGE_MEMBERS, "remove other members")
        member = await _find_member(conn, project_id, user_id)
        if member is None:
            raise MemberNotFound()
        if member.role == Role.OWNER and await _owner_count(conn, project_id) == 1:
            raise LastOwner()
        audience = await _member_ids(conn, project_id)
        await conn.execute(
            "DELETE FROM project_members WHERE project_id = $1 AND user_id = $2",
            project_id,
            user_id,
        )
        if member.role == Role.OWNER:
            await _reassign_primary_owner(conn, project_id, user_id)
        event = await append_event(
            conn,
            project_id,
            EventType.MEMBER_REMOVED,
            actor_id,
            {"user_id": user_id, "role": member.role.value},
        )
        return Change(None, [event], audience)

    return await db.transaction(remove)
