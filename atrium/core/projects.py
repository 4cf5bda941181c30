"""Projects' vocabulary, free of I/O: a project and a member as callers see them, and the
refused project operations, each with a stable ``code`` (HTTP maps them to statuses).

``atrium.persistence.projects`` builds these records from rows and raises these refusals
under the project's row lock; ``atrium.domain.projects`` is the service views call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from .roles import Role


@dataclass(frozen=True, slots=True)
class Project:
    """A project as one member sees it (``role`` is that member's role)."""

    id: uuid.UUID
    name: str
    description: str | None
    visibility: str
    owner_id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    collaborator_count: int  # every member, owners included
    role: Role


@dataclass(frozen=True, slots=True)
class ProjectPage:
    projects: list[Project]
    total: int


@dataclass(frozen=True, slots=True)
class Member:
    user_id: uuid.UUID
    project_id: uuid.UUID
    email: str
    role: Role
    invited_at: datetime
    invited_by: uuid.UUID | None  # None for the project's creator


class ProjectError(Exception):
    """A refused project operation; ``code`` is stable."""

    code = "project_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProjectNotFound(ProjectError):
    code = "project_not_found"

    def __init__(self) -> None:
        super().__init__("No such project")


class RoleForbidden(ProjectError):
    """The actor is a member, but their role does not allow the action."""

    code = "forbidden_role"


class LastOwner(ProjectError):
    code = "last_owner"

    def __init__(self) -> None:
        super().__init__("A project must keep at least one owner")


class AlreadyMember(ProjectError):
    code = "already_member"

    def __init__(self) -> None:
        super().__init__("This user is already a member of the project")


class UserNotFound(ProjectError):
    code = "user_not_found"

    def __init__(self) -> None:
        super().__init__("No such user")


class MemberNotFound(ProjectError):
    code = "member_not_found"

    def __init__(self) -> None:
        super().__init__("This user is not a member of the project")
