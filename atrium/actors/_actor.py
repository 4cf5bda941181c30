"""The actor: a trio task that owns its state alone, reached through a bounded mailbox."""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Generic, Self, TypeVar, cast

import outcome
import trio

from ._errors import ActorStopped, AskTimeout, MailboxFull
from ._reply import Ask

logger = logging.getLogger("atrium.actors")

MsgT = TypeVar("MsgT")
ReplyT = TypeVar("ReplyT")

# An actor that always finds a message waiting would never reach a checkpoint if its
# handler does not await anything; it yields after this many back-to-back messages.
_BURST: Final = 128

_NEW: Final = 0
_RUNNING: Final = 1
_STOPPING: Final = 2
_STOPPED: Final = 3


class _IdleTick:
    """Marker returned by the mailbox wait when the idle timeout passed without a message."""


_IDLE: Final = _IdleTick()


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """A point-in-time view of an actor's mailbox and work."""

    mailbox_depth: int
    """Messages waiting in the mailbox (not counting senders blocked on a full one)."""
    mailbox_capacity: int
    processed: int
    """Messages handled since the actor started."""
    alive: bool
    """True while the actor accepts messages."""


class Actor(abc.ABC, Generic[MsgT, ReplyT]):
    """Base class for actors: subclass it and implement :meth:`handle`.

    The actor object is its own reference: other tasks call :meth:`tell`, :meth:`tell_nowait`
    and :meth:`ask`, never touch its state, and run it with :meth:`run` (usually through a
    supervisor, see ``atrium.supervision.actor_spec``). An actor runs once; a restart builds
    a new one.

    Handler errors follow OTP's "let it crash": an exception from :meth:`handle` ends
    :meth:`run` with that exception (a supervisor then restarts the actor with fresh state),
    and if the message was an ``ask`` the asker receives the same exception. Errors listed in
    :attr:`expected_errors` are refusals, not crashes: an asker receives them and the actor
    carries on (for a ``tell`` they are logged and dropped).
    """

    __slots__ = (
        "name",
        "_send",
        "_receive",
        "_capacity",
        "_idle_timeout",
        "_processed",
        "_state",
        "_nursery",
        "_held",
    )

    expected_errors: ClassVar[tuple[type[Exception], ...]] = ()
    """Exception types that answer an ``ask`` without crashing the actor."""

    def __init__(
        self,
        *,
        name: str | None = None,
        mailbox_size: int = 1024,
        idle_timeout: float | None = None,
    ) -> None:
        """Create a stopped actor with a mailbox of ``mailbox_size`` messages.

        With ``idle_timeout`` set, the actor stops itself (normally, as if
        :meth:`request_stop` were called) once no message has arrived for that many seconds
        and :meth:`is_idle` agrees.

        Raises ValueError for a mailbox smaller than one message or a non-positive timeout.
        """
        if mailbox_size < 1:
            raise ValueError("mailbox_size must be at least 1")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError("idle_timeout must be positive")
        self.name = name if name is not None else type(self).__name__
        self._send, self._receive = trio.open_memory_channel[MsgT | Ask[MsgT]](mailbox_size)
        self._capacity = mailbox_size
        self._idle_timeout = idle_timeout
        self._processed = 0
        self._state = _NEW
        self._nursery: trio.Nursery | None = None
        self._held: MsgT | Ask[MsgT] | None = None  # looked at by take_nowait, not taken

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- behaviour, overridden by subclasses ------------------------------------------------

    @abc.abstractmethod
    async def handle(self, message: MsgT) -> ReplyT:
        """Handle one message; the return value answers an ``ask`` (ignored for a ``tell``)."""

    async def on_start(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Run before the first message; :attr:`nursery` is already open."""

    async def on_stop(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Run after a graceful stop, once the queued messages are handled.

        It does not run after a crash or a forced cancellation: the state may be torn.
        """

    def is_idle(self) -> bool:
        """Whether the idle timeout may stop this actor now; by default, always.

        Actors that stay busy without messages (open connections, say) override this.
        """
        return True

    def take_nowait(self, accept: Callable[[MsgT], bool]) -> MsgT | None:
        """The next queued message if it was told (not asked) and ``accept`` takes it.

        For handlers that batch: while handling one message, take the like ones queued
        behind it. A message that is not taken stays next in line.
        """
        try:
            item = self._next_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None
        if type(item) is not Ask and accept(cast(MsgT, item)):
            self._processed += 1
            return cast(MsgT, item)
        self._held = item
        return None

    def _next_nowait(self) -> MsgT | Ask[MsgT]:
        """The next item: the one ``take_nowait`` left next in line, else the mailbox's.

        Raises trio.WouldBlock (nothing queued) or trio.EndOfChannel (closed and empty).
        """
        item = self._held
        if item is None:
            return self._receive.receive_nowait()
        self._held = None
        return item

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True from :meth:`run` until a stop is requested or the actor ends."""
        return self._state == _RUNNING

    @property
    def nursery(self) -> trio.Nursery:
        """A nursery for the actor's own background tasks (timers, say), open while it runs.

        Its tasks are cancelled when the actor ends; a crash in one crashes the actor.
        Raises RuntimeError when the actor is not running.
        """
        if self._nursery is None:
            raise RuntimeError(f"{self!r} is not running")
        return self._nursery

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the actor: ``on_start``, ``task_status.started(self)``, then handle messages
        until a stop is requested (then ``on_stop`` and a normal return), a handler crashes
        (the error propagates) or the task is cancelled.

        When it ends, messages still queued are dropped and their askers get ActorStopped.
        Raises RuntimeError if this actor object has already run.
        """
        if self._state != _NEW:
            raise RuntimeError(f"{self!r} has already run; actors are not restarted in place")
        self._state = _RUNNING
        failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self.on_start()
                    task_status.started(self)
                    await self._serve()
                    await self.on_stop()
                except Exception as exc:
                    # Dead to anyone who looks from now on, before the nursery's exit yields.
                    self._state = _STOPPING
                    # Kept outside the nursery so the supervisor sees the handler's own
                    # exception, not an ExceptionGroup wrapping it.
                    failure = exc
                nursery.cancel_scope.cancel()
        finally:
            self._close()
        if failure is not None:
            raise failure

    def request_stop(self) -> None:
        """Ask the actor to stop gracefully: the mailbox closes to new messages (senders get
        ActorStopped), the messages already queued are handled, ``on_stop`` runs and
        :meth:`run` returns normally. Returns at once; idempotent."""
        if self._state == _RUNNING:
            self._state = _STOPPING
            self._send.close()

    async def _serve(self) -> None:
        receive = self._receive
        burst = 0
        while True:
            try:
                item = self._next_nowait()
                empty = False
            except trio.WouldBlock:
                # Parked outside the except clause: an exception caught there lives (with
                # its traceback and frames) for as long as the clause awaits, and an idle
                # actor parks for minutes.
                empty = True
            except trio.EndOfChannel:
                return
            if empty:
                burst = 0
                try:
                    # Inlined when there is no idle timer: one frame less per idle actor.
                    got = (
                        await receive.receive()
                        if self._idle_timeout is None
                        else await self._wait_or_idle()
                    )
                except trio.EndOfChannel:
                    return
                if isinstance(got, _IdleTick):
                    if self.is_idle():
                        logger.debug("%r idle for %ss, stopping", self, self._idle_timeout)
                        self.request_stop()
                    continue
                item = got
            else:
                burst += 1
                if burst >= _BURST:
                    burst = 0
                    await trio.lowlevel.checkpoint()
            await self._dispatch(item)
            self._processed += 1

    async def _wait_or_idle(self) -> MsgT | Ask[MsgT] | _IdleTick:
        # Only the path that parks pays for the idle timer's cancel scope.
        assert self._idle_timeout is not None
        with trio.move_on_after(self._idle_timeout):
            return await self._receive.receive()
        return _IDLE

    async def _dispatch(self, item: MsgT | Ask[MsgT]) -> None:
        if type(item) is Ask:
            ask = cast(Ask[MsgT], item)
            if ask.abandoned:
                return
            try:
                result = await self.handle(ask.message)
            except self.expected_errors as exc:
                ask.resolve(outcome.Error(exc))
            except Exception as exc:
                # The asker may run before this task unwinds: it must already see a dead actor.
                self._state = _STOPPING
                ask.resolve(outcome.Error(exc))
                raise
            except BaseException:
                self._state = _STOPPING
                ask.resolve(outcome.Error(ActorStopped(f"{self!r} stopped while handling")))
                raise
            else:
                ask.resolve(outcome.Value(result))
        else:
            try:
                await self.handle(cast(MsgT, item))
            except self.expected_errors as exc:
                logger.warning("%r refused a message nobody waits for: %r", self, exc)

    def _close(self) -> None:
        self._state = _STOPPED
        self._nursery = None
        # Senders blocked on a full mailbox get ClosedResourceError, reported as ActorStopped.
        self._send.close()
        stopped: ActorStopped | None = None
        while True:
            try:
                item = self._next_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if type(item) is Ask:
                stopped = stopped or ActorStopped(f"{self!r} stopped before answering")
                item.resolve(outcome.Error(stopped))
        self._receive.close()

    # -- the reference side: called by other tasks ------------------------------------------

    async def tell(self, message: MsgT) -> None:
        """Send a message without waiting for it to be handled; while the mailbox is full,
        wait for room (the back-pressure policy).

        Raises ActorStopped if the actor is stopping or stopped.
        """
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorStopped(f"{self!r} is not accepting messages") from None

    def tell_nowait(self, message: MsgT) -> None:
        """Send a message without ever blocking (the fail-fast policy).

        Raises MailboxFull if the mailbox is full, ActorStopped if the actor is stopping or
        stopped.
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(f"{self!r} mailbox is full ({self._capacity})") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorStopped(f"{self!r} is not accepting messages") from None

    # A default timeout is the point: an ask never hangs, even if the caller forgets.
    async def ask(self, message: MsgT, *, timeout: float | None = 5.0) -> ReplyT:  # noqa: ASYNC109
        """Send a message and wait for :meth:`handle`'s answer, waiting for mailbox room
        first if needed; ``timeout`` (seconds, None for no limit) covers both waits.

        Returns what the handler returned; raises what the handler raised, AskTimeout when
        the timeout passes (the message is then skipped if not yet handled), ActorStopped
        if the actor stops before answering.
        """
        slot = Ask(message)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            try:
                await self._send.send(slot)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise ActorStopped(f"{self!r} is not accepting messages") from None
            return cast(ReplyT, await slot.wait())
        raise AskTimeout(f"{self!r} did not answer within {timeout}s")

    def statistics(self) -> ActorStatistics:
        """Return the mailbox depth and capacity, the messages handled and liveness."""
        return ActorStatistics(
            mailbox_depth=self._send.statistics().current_buffer_used,
            mailbox_capacity=self._capacity,
            processed=self._processed,
            alive=self._state == _RUNNING,
        )
