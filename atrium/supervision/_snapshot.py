"""Plain, JSON-ready records of a supervision tree's state (for /health/supervisor)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """The last abnormal exit of a child."""

    type: str
    """The exception's class name."""
    message: str
    at: str
    """Wall-clock time, ISO-8601 in UTC."""


@dataclass(frozen=True, slots=True)
class ChildSnapshot:
    """One child of a supervisor."""

    name: str
    kind: str
    """``worker`` or ``supervisor``."""
    restart: str
    """``permanent``, ``transient`` or ``temporary``."""
    state: str
    """``starting``, ``running``, ``restarting``, ``stopping``, ``stopped`` or ``failed``."""
    restart_count: int
    escalation_count: int
    """How often the child, a nested supervisor, gave up and failed upward (escalated)."""
    last_failure: FailureInfo | None
    uptime: float | None
    """Seconds since the current instance started; None when not running."""
    mailbox_depth: int | None
    """Messages waiting, when the child is an actor."""
    supervisor: SupervisorSnapshot | None
    """The nested tree, when the child is a running supervisor."""
    detail: dict[str, Any] | None = None
    """What the child says about itself (``snapshot_detail()``), e.g. a job actor's job."""


@dataclass(frozen=True, slots=True)
class SupervisorSnapshot:
    """A supervisor and, recursively, its children."""

    name: str
    strategy: str
    state: str
    """``running``, ``stopping``, ``stopped`` or ``failed`` (escalated)."""
    uptime: float
    healthy: bool
    children: tuple[ChildSnapshot, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as nested dicts, lists and scalars (JSON-ready)."""
        return dataclasses.asdict(self, dict_factory=dict)
