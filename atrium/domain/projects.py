"""Project and membership changes as whole sequences: write, invalidate, publish.

Each write commits in one transaction together with the events it appends
(``persistence.projects``), then drops the cached project lists of every user whose view
changed, then hands the events to the live workspaces. HTTP handlers call this today; job
tasks will call it next, so no caller has to remember the order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import trio

from ..core.events import EventPublisher
from ..core.projects import Member, Project, ProjectPage
from ..core.roles import Role
from ..identity.cache import UserCache
from ..persistence import events as event_log
from ..persistence import projects
from ..persistence.database import Database
from ..persistence.events import EventPage
from ..persistence.projects import Change

log = logging.getLogger("atrium.projects")

T = TypeVar("T")


class Projects:
    """The project service of one database pool.

    Reads answer as a member sees the project; a project the caller is not a member of
    raises ``ProjectNotFound``, as a missing one does. Writes raise the refusals of
    ``persistence.projects`` (``RoleForbidden``, ``LastOwner``, ...) before anything is
    committed, invalidated or published.
    """

    def __init__(self, db: Database, project_cache: UserCache, publisher: EventPublisher) -> None:
        self._db = db
        self._cache = project_cache
        self._publisher = publisher

    async def _commit(self, write: Awaitable[Change[T]]) -> T:
        """Run a write, then invalidate the caches it touched and publish its events.

        Shielded: once a write has committed, the invalidation must happen even if the
        caller has gone away, or a stale list would be served until its entry expires.
        Publishing may fail without failing the write: the change is durable, and live
        clients catch up from the log.
        """
        with trio.CancelScope(shield=True):
            change = await write
            if change.audience:
                await self._cache.invalidate(change.audience)
        if change.events:
            project_id = change.events[0].project_id
            try:
                await self._publisher.publish(project_id, change.events)
            except Exception:
                log.exception("publishing events of project %s failed", project_id)
        return change.value

    # -- reads ------------------------------------------------------------------------------

    async def page(self, user_id: uuid.UUID, *, limit: int, offset: int) -> ProjectPage:
        """One page of ``user_id``'s live projects, newest first, and their total."""
        return await projects.list_projects(self._db, user_id, limit=limit, offset=offset)

    async def get(self, project_id: uuid.UUID, user_id: uuid.UUID) -> Project:
        return await projects.get_project(self._db, project_id, user_id)

    async def role(self, project_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
        """``user_id``'s role in the live project, or None (not a member, missing, deleted)."""
        return await projects.member_role(self._db, project_id, user_id)

    async def members(self, project_id: uuid.UUID, user_id: uuid.UUID) -> list[Member]:
        return await projects.list_members(self._db, project_id, user_id)

    async def events(
        self, project_id: uuid.UUID, user_id: uuid.UUID, *, since_seq: int, limit: int
    ) -> EventPage:
        """The project's log after ``since_seq`` (see ``persistence.events.list_events``)."""
        return await event_log.list_events(
            self._db, project_id, user_id, since_seq=since_seq, limit=limit
        )

    # -- writes -----------------------------------------------------------------------------

    async def create(
        self, owner_id: uuid.UUID, *, name: str, description: str | None, visibility: str
    ) -> Project:
        """A new project owned by ``owner_id``; logs PROJECT_CREATED."""
        return await self._commit(
            projects.create_project(
                self._db, owner_id, name=name, description=description, visibility=visibility
            )
        )

    async def update(
        self, project_id: uuid.UUID, actor_id: uuid.UUID, changes: Mapping[str, Any]
    ) -> Project:
        """Apply ``changes`` (name, description, visibility); logs PROJECT_UPDATED when
        something actually changed."""
        return await self._commit(projects.update_project(self._db, project_id, actor_id, changes))

    async def delete(self, project_id: uuid.UUID, actor_id: uuid.UUID) -> None:
        """Delete the project (owners only); logs PROJECT_DELETED, which closes its
        workspace."""
        await self._commit(projects.delete_project(self._db, project_id, actor_id))

    async def add_member(
        self,
        project_id: uuid.UUID,
        actor_id: uuid.UUID,
        *,
        role: Role,
        user_id: uuid.UUID | None = None,
        email: str | None = None,
    ) -> Member:
        """Add the user given by ``user_id`` or ``email``; logs MEMBER_ADDED."""
        return await self._commit(
            projects.add_member(
                self._db, project_id, actor_id, role=role, user_id=user_id, email=email
            )
        )

    async def change_role(
        self, project_id: uuid.UUID, actor_id: uuid.UUID, user_id: uuid.UUID, role: Role
    ) -> Member:
        """Give member ``user_id`` the ``role``; logs MEMBER_ROLE_CHANGED when it changed."""
        return await self._commit(
            projects.change_role(self._db, project_id, actor_id, user_id, role)
        )

    async def remove_member(
        self, project_id: uuid.UUID, actor_id: uuid.UUID, user_id: uuid.UUID
    ) -> None:
        """Remove member ``user_id``; logs MEMBER_REMOVED, which closes their connections."""
        await self._commit(projects.remove_member(self._db, project_id, actor_id, user_id))
