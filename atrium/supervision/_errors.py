"""Errors of the supervision tree, each with a stable ``code``."""

from __future__ import annotations

from typing import ClassVar


class SupervisionError(Exception):
    """Base class of the supervision errors."""

    code: ClassVar[str] = "supervision_error"


class SupervisorEscalation(SupervisionError):
    """A supervisor gave up: its children restarted more than ``max_restarts`` times within
    ``period`` seconds. It stopped them all and fails upward with this error.

    ``failure`` is the last child failure (None when that child returned normally), also
    chained as ``__cause__``.
    """

    code: ClassVar[str] = "supervisor_escalation"

    def __init__(
        self, message: str, *, supervisor: str, child: str, failure: BaseException | None
    ) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.child = child
        self.failure = failure


class ChildExists(SupervisionError):
    """A child with that name is already supervised here."""

    code: ClassVar[str] = "child_exists"


class NoSuchChild(SupervisionError):
    """No child with that name is supervised here."""

    code: ClassVar[str] = "no_such_child"


class SupervisorStopped(SupervisionError):
    """The supervisor is stopping or stopped and starts no more children."""

    code: ClassVar[str] = "supervisor_stopped"
