"""What a supervisor may ask of a child's value, beyond cancelling the child.

Supervision knows no concrete kind of child. A value that has ``request_stop()`` is asked
to stop gracefully before it is cancelled; one that also reports ``alive`` and
``statistics()`` (an actor does) is a ``Supervised`` process (checked by duck typing: a
runtime-checkable Protocol costs ~10 us per check): the registry
(``get_or_start``) skips one that is no longer alive, and the snapshot shows its mailbox
depth.
"""

from __future__ import annotations

from typing import Protocol, Self

import trio


class Stoppable(Protocol):
    def request_stop(self) -> None:
        """Start a graceful stop and return at once; the child then ends by itself."""
        ...


class MailboxStatistics(Protocol):
    @property
    def mailbox_depth(self) -> int:
        """Messages waiting to be handled."""
        ...


class Supervised(Protocol):
    """A process a supervisor can watch and stop: alive, stop, statistics."""

    @property
    def alive(self) -> bool:
        """True while it accepts work; False once it is stopping or stopped."""
        ...

    def request_stop(self) -> None:
        """Start a graceful stop and return at once."""
        ...

    def statistics(self) -> MailboxStatistics:
        """A point-in-time view that includes its mailbox depth."""
        ...


class Runnable(Supervised, Protocol):
    """A ``Supervised`` process that runs once, reporting itself as started (an actor)."""

    async def run(self, *, task_status: trio.TaskStatus[Self] = ...) -> None:
        """Run until it stops; ``task_status.started(self)`` once it is up."""
        ...
