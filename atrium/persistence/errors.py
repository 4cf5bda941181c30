"""Refused project operations, each with a stable ``code`` (HTTP maps them to statuses)."""

from __future__ import annotations


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
