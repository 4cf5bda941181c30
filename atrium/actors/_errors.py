"""Errors of the actor runtime, each with a stable ``code`` that tests and API bodies use."""

from __future__ import annotations

from typing import ClassVar


class ActorError(Exception):
    """Base class of the actor runtime's errors."""

    code: ClassVar[str] = "actor_error"


class MailboxFull(ActorError):
    """``tell_nowait`` found the mailbox full: the fail-fast overload policy."""

    code: ClassVar[str] = "mailbox_full"


class ActorStopped(ActorError):
    """The actor is stopping or has stopped: it takes no more messages, and a pending
    ``ask`` will never be answered."""

    code: ClassVar[str] = "actor_stopped"


class AskTimeout(ActorError):
    """No reply to an ``ask`` arrived within its timeout."""

    code: ClassVar[str] = "ask_timeout"
