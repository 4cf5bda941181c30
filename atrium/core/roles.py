"""Project roles and what each may do: the one permission table of atrium.

HTTP handlers and the WebSocket workspace both ask ``can(role, action)``; nothing else
decides what a member may do.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Role(enum.StrEnum):
    """A member's role in one project (stored as its value)."""

    OWNER = "owner"
    COLLABORATOR = "collaborator"
    VIEWER = "viewer"


class Action(enum.StrEnum):
    """Something a member may try to do to a project."""

    EDIT_DETAILS = "edit_details"  # name and description
    CHANGE_VISIBILITY = "change_visibility"
    DELETE = "delete"
    MANAGE_MEMBERS = "manage_members"  # add, change roles, remove others
    LEAVE = "leave"  # remove oneself
    EDIT_WORKSPACE = "edit_workspace"  # file changes in the live workspace
    RUN_JOBS = "run_jobs"  # submit background jobs tied to the project


# Every member may read the project, its members and its event log, and send cursors:
# those need no action here.
_VIEWER = frozenset({Action.LEAVE})
_COLLABORATOR = _VIEWER | {Action.EDIT_DETAILS, Action.EDIT_WORKSPACE, Action.RUN_JOBS}
_OWNER = frozenset(Action)

PERMISSIONS: Mapping[Role, frozenset[Action]] = {
    Role.OWNER: _OWNER,
    Role.COLLABORATOR: _COLLABORATOR,
    Role.VIEWER: _VIEWER,
}
"""Every role's allowed actions. An owner may do everything."""


def can(role: Role, action: Action) -> bool:
    """True when a member with ``role`` may perform ``action``."""
    return action in PERMISSIONS[role]
