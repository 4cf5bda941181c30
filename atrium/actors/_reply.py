"""The one-shot reply slot that carries an ``ask`` and its answer.

A slot parks the asking task directly with ``trio.lowlevel.wait_task_rescheduled``: it
allocates one small object per ask, where a ``trio.Event`` would add a parking lot and a
one-shot memory channel a whole channel state (measured in ``bench/actors.py``).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import outcome
import trio

MsgT = TypeVar("MsgT")


class Ask(Generic[MsgT]):
    """A message that wants an answer, and the place the answer goes."""

    __slots__ = ("message", "abandoned", "_task", "_outcome")

    def __init__(self, message: MsgT) -> None:
        self.message = message
        # Set when the asker stopped waiting (timeout or cancellation); the actor then
        # skips the message rather than do work nobody will see.
        self.abandoned = False
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome[Any] | None = None

    def resolve(self, result: outcome.Outcome[Any]) -> None:
        """Deliver the answer; the first one wins and an abandoned slot drops it."""
        if self.abandoned or self._outcome is not None:
            return
        task = self._task
        if task is None:
            # The reply beat the asker to its wait (the send checkpoint let the actor run).
            self._outcome = result
        else:
            self._task = None
            self._outcome = result
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> Any:
        """Wait for the answer: return the value or raise the error it carries.

        Cancellation (the ask's timeout) abandons the slot.
        """
        if self._outcome is not None:
            return self._outcome.unwrap()
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED
