"""The supervisor: starts children from specs and restarts them by OTP rules."""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, Generic, TypeVar, cast

import trio

from ..core.logs import detached
from ..core.timestamps import utc_now_iso
from ._errors import ChildExists, NoSuchChild, SupervisorEscalation, SupervisorStopped
from ._protocol import Runnable, Supervised
from ._snapshot import ChildSnapshot, FailureInfo, SupervisorSnapshot
from ._spec import Backoff, ChildSpec, Restart, Strategy

logger = logging.getLogger("atrium.supervision")

T = TypeVar("T")
A = TypeVar("A", bound=Runnable)


class ChildState(enum.StrEnum):
    """Where a child is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    """Ended and waiting out its backoff (or for siblings to stop) before starting again."""
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    """Ended with an error and will not be restarted."""


class ChildHandle(Generic[T]):
    """A supervised child, as its supervisor sees it. Read-only for everyone else."""

    __slots__ = (
        "spec",
        "_state",
        "_value",
        "_changed",
        "_restart_count",
        "_escalation_count",
        "_recent_restarts",
        "_last_failure",
        "_started_at",
        "_scope",
        "_exited",
        "_live",
        "_stopping",
        "_removed",
        "_pending",
    )

    def __init__(self, spec: ChildSpec[T]) -> None:
        self.spec = spec
        self._state = ChildState.STARTING
        self._value: T | None = None
        # Made by the first waiter (get_or_start) and dropped on the next state change, so
        # the thousands of children nobody waits on carry no Event.
        self._changed: trio.Event | None = None
        self._restart_count = 0
        self._escalation_count = 0
        # A list, not a deque: it is short, and an empty deque costs 600 bytes per child.
        self._recent_restarts: list[float] = []
        self._last_failure: FailureInfo | None = None
        self._started_at: float | None = None
        self._scope = trio.CancelScope()
        self._exited = trio.Event()
        self._live = False
        self._stopping = False
        self._removed = False
        self._pending: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<ChildHandle {self.spec.name!r} {self._state}>"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> ChildState:
        return self._state

    @property
    def value(self) -> T:
        """What the current (or, while restarting, the last) instance passed to
        ``task_status.started()``: the actor itself for actor children."""
        return cast(T, self._value)

    @property
    def restart_count(self) -> int:
        """Restarts since the child was added."""
        return self._restart_count

    @property
    def escalation_count(self) -> int:
        """How often the child (a nested supervisor) gave up and failed to this one with
        SupervisorEscalation, since the child was added; each also counts as a crash."""
        return self._escalation_count

    @property
    def last_failure(self) -> FailureInfo | None:
        return self._last_failure

    def _set_state(self, state: ChildState) -> None:
        self._state = state
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()


class _StartStatus(trio.TaskStatus[Any]):
    """Wraps the ``nursery.start`` status to record the child's value when it comes up."""

    __slots__ = ("_inner", "_child", "_supervisor", "done")

    def __init__(
        self, inner: trio.TaskStatus[Any], child: ChildHandle[Any], supervisor: Supervisor
    ) -> None:
        self._inner: trio.TaskStatus[Any] | None = inner
        self._child = child
        self._supervisor = supervisor
        self.done = False

    def started(self, value: Any = None) -> None:
        if self._inner is None:
            raise RuntimeError("called 'started' twice on the same task status")
        # trio's status keeps the temporary start nursery alive, and the child's frame
        # keeps this object for its whole life: let go of it (about 1 KB per idle child).
        inner, self._inner = self._inner, None
        child = self._child
        self.done = True
        # Starting is cancellable like nursery.start: if the starter gave up (or the child
        # was terminated meanwhile), trio leaves the child with its cancelled starter, to
        # unwind at its next checkpoint. It is not up, and no longer ours to restart.
        gave_up = trio.current_effective_deadline() == -math.inf
        inner.started(value)
        if gave_up or child._removed or self._supervisor._state is not _SupState.RUNNING:
            child._stopping = True
            child._scope.cancel()
            return
        # Up: from now on only the supervisor stops it, one child at a time, so that a
        # cancelled supervisor still stops its children in reverse order.
        child._scope.shield = True
        child._value = value
        child._started_at = trio.current_time()
        child._live = True
        child._set_state(ChildState.RUNNING)


class _SupState(enum.StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Supervisor:
    """Supervises children; made by :func:`open_supervisor`, which owns its lifetime."""

    def __init__(
        self,
        *,
        name: str,
        strategy: Strategy,
        max_restarts: int,
        period: float,
        backoff: Backoff,
        nursery: trio.Nursery,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.period = period
        self.backoff = backoff
        self._nursery = nursery
        self._children: dict[str, ChildHandle[Any]] = {}
        self._restarts: deque[float] = deque()
        self._state = _SupState.RUNNING
        self._started_at = trio.current_time()
        self._escalation: SupervisorEscalation | None = None
        # Group restarts stop and start several children; this keeps them, and starts,
        # from interleaving. One-for-one children are independent and skip it.
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r} {self.strategy} {self._state}>"

    # -- public surface ---------------------------------------------------------------------

    async def start_child(self, spec: ChildSpec[T]) -> ChildHandle[T]:
        """Start a child and return its handle once it is up (its factory called
        ``task_status.started``); children are stopped in the reverse of this order.

        Raises ChildExists if the name is taken, SupervisorStopped if the supervisor is
        stopping, and whatever the factory raised before it was up (the child is then not
        kept, and this is not counted as a restart).
        """
        if self._state is not _SupState.RUNNING:
            raise SupervisorStopped(f"supervisor {self.name!r} is not running")
        if spec.name in self._children:
            raise ChildExists(f"supervisor {self.name!r} already has a child {spec.name!r}")
        child = ChildHandle(spec)
        # Claimed before the first checkpoint, so racing get_or_start calls find it.
        self._children[spec.name] = child
        try:
            async with self._group_lock():
                with detached():  # the child outlives the request that may start it
                    await self._nursery.start(self._run_instance, child)
        except BaseException:
            # A caller cancelled while a (shielded) child was starting may see Cancelled
            # after the child came up: that child is supervised as usual, not dropped.
            if child._started_at is None:
                if self._children.get(spec.name) is child:
                    del self._children[spec.name]
                child._set_state(ChildState.STOPPED)
            raise
        logger.info("%s: started %s", self.name, spec.name)
        return child

    async def terminate_child(self, name: str) -> None:
        """Stop a child (the shutdown protocol, see :func:`open_supervisor`) and forget it;
        it is not restarted whatever its restart type. Returns once it has ended; a child
        still starting is forgotten at once and stopped as soon as it is up.

        Raises NoSuchChild if there is no child by that name.
        """
        child = self._children.pop(name, None)
        if child is None:
            raise NoSuchChild(f"supervisor {self.name!r} has no child {name!r}")
        child._removed = True
        if child._pending is not None:
            child._pending.cancel()
        await self._stop_instance(child)
        child._set_state(ChildState.STOPPED)
        logger.info("%s: terminated %s", self.name, name)

    def which_children(self) -> list[ChildHandle[Any]]:
        """The children, in start order."""
        return list(self._children.values())

    def child(self, name: str) -> ChildHandle[Any]:
        """The child with that name. Raises NoSuchChild."""
        try:
            return self._children[name]
        except KeyError:
            raise NoSuchChild(f"supervisor {self.name!r} has no child {name!r}") from None

    async def get_or_start(self, spec: ChildSpec[T]) -> T:
        """Return the live value (the actor, for actor specs) of the child named
        ``spec.name``, starting it from ``spec`` if there is none.

        Any number of concurrent calls for one name start exactly one child and all get
        its value. A child that is starting or restarting is waited for, so after a crash
        this returns the restarted instance, never the dead one; an actor that is stopping
        (idle) is waited out and a fresh one started. A value may still stop at any moment
        afterwards: on ActorStopped, call again.

        Raises SupervisorStopped if the supervisor stops, and what start_child raises.
        """
        while True:
            if self._state is not _SupState.RUNNING:
                raise SupervisorStopped(f"supervisor {self.name!r} is not running")
            child = self._children.get(spec.name)
            if child is None:
                return (await self.start_child(spec)).value
            if child._state is ChildState.RUNNING and _is_alive(child._value):
                return cast(T, child._value)
            if child._live and not _is_alive(child._value):
                # A stopping actor: it ends soon, then is restarted or removed.
                await child._exited.wait()
            else:
                await child._wait_changed()

    def healthy(self) -> bool:
        """False while the supervisor is not running, any permanent child is not running
        (starting, restarting, failed), or a running child supervisor is unhealthy."""
        if self._state is not _SupState.RUNNING:
            return False
        for child in self._children.values():
            if child._state is not ChildState.RUNNING:
                if child.spec.restart is Restart.PERMANENT:
                    return False
            elif isinstance(child._value, Supervisor) and not child._value.healthy():
                return False
        return True

    def snapshot(self) -> SupervisorSnapshot:
        """The supervisor and its tree as plain records (``.to_dict()`` for JSON)."""
        now = trio.current_time()
        return SupervisorSnapshot(
            name=self.name,
            strategy=str(self.strategy),
            state=str(self._state),
            uptime=now - self._started_at,
            healthy=self.healthy(),
            children=tuple(_child_snapshot(child, now) for child in self._children.values()),
        )

    # -- running one instance of a child ----------------------------------------------------

    def _group_lock(self) -> AbstractAsyncContextManager[object]:
        if self.strategy is Strategy.ONE_FOR_ONE:
            return nullcontext()
        return self._lock

    async def _run_instance(
        self, child: ChildHandle[Any], *, task_status: trio.TaskStatus[Any]
    ) -> None:
        # Shielded once the child is up (see _StartStatus.started), not while starting.
        scope = trio.CancelScope()
        exited = trio.Event()
        child._scope, child._exited = scope, exited
        child._stopping = False
        status = _StartStatus(task_status, child, self)
        # The frame lives as long as the child; trio's status would pin the start nursery.
        del task_status
        failure: Exception | None = None
        try:
            try:
                with scope:
                    await child.spec.factory(task_status=status)
            except Exception as exc:
                if not status.done:
                    raise  # to nursery.start's caller: the child never came up
                failure = exc
            child._live = False
            if status.done:
                self._instance_ended(child, failure)
        finally:
            child._live = False
            # Set after the bookkeeping, so a waiter wakes to the child's new state.
            exited.set()

    def _instance_ended(self, child: ChildHandle[Any], failure: Exception | None) -> None:
        """Bookkeeping when an instance ends (or fails to start during a restart)."""
        if child._stopping:
            return  # stopped by this supervisor: whoever stops it sets the state
        name = child.spec.name
        if isinstance(failure, SupervisorEscalation):
            child._escalation_count += 1
        if failure is not None:
            child._last_failure = FailureInfo(
                type=type(failure).__name__,
                message=str(failure),
                at=utc_now_iso(),
            )
            logger.warning("%s: child %s failed", self.name, name, exc_info=failure)
        else:
            logger.info("%s: child %s returned", self.name, name)
        restart = child.spec.restart
        if (
            self._state is not _SupState.RUNNING
            or child._removed
            or restart is Restart.TEMPORARY
            or (restart is Restart.TRANSIENT and failure is None)
        ):
            if self._children.get(name) is child:
                del self._children[name]
            child._set_state(ChildState.STOPPED if failure is None else ChildState.FAILED)
            return
        now = trio.current_time()
        if not self._within_intensity(now):
            child._set_state(ChildState.FAILED)
            self._escalate(child, failure)
            return
        recent = child._recent_restarts
        recent.append(now)
        horizon = now - self.period
        del recent[: sum(1 for at in recent if at <= horizon)]
        delay = self.backoff.delay(len(recent))
        child._restart_count += 1
        logger.info(
            "%s: restarting %s in %.3fs (%s, restart %d within %ss)",
            self.name,
            name,
            delay,
            self.strategy,
            len(recent),
            self.period,
        )
        if self.strategy is Strategy.ONE_FOR_ONE:
            child._set_state(ChildState.RESTARTING)
            self._nursery.start_soon(self._restart_one, child, delay)
            return
        children = list(self._children.values())
        group = (
            children if self.strategy is Strategy.ONE_FOR_ALL else children[children.index(child) :]
        )
        for member in group:
            # A member that ends before the group task stops it is restarted anyway.
            member._stopping = member._live
            member._set_state(ChildState.RESTARTING)
        self._nursery.start_soon(self._restart_group, child, group, delay)

    def _within_intensity(self, now: float) -> bool:
        restarts = self._restarts
        restarts.append(now)
        while restarts[0] <= now - self.period:
            restarts.popleft()
        return len(restarts) <= self.max_restarts

    def _escalate(self, child: ChildHandle[Any], failure: Exception | None) -> None:
        self._state = _SupState.FAILED
        escalation = SupervisorEscalation(
            f"supervisor {self.name!r} gave up: more than {self.max_restarts} restarts within "
            f"{self.period}s, last in child {child.spec.name!r} ({failure!r})",
            supervisor=self.name,
            child=child.spec.name,
            failure=failure,
        )
        escalation.__cause__ = failure
        self._escalation = escalation
        logger.error("%s: escalating: %s", self.name, escalation)
        # The body of open_supervisor is cancelled; its exit stops the children in order.
        self._nursery.cancel_scope.cancel()

    async def _restart_one(self, child: ChildHandle[Any], delay: float) -> None:
        with trio.CancelScope() as pending:
            child._pending = pending
            await trio.sleep(delay)
        child._pending = None
        if not pending.cancelled_caught:
            await self._start_again(child)

    async def _restart_group(
        self, failed: ChildHandle[Any], group: list[ChildHandle[Any]], delay: float
    ) -> None:
        async with self._lock:
            for member in reversed(group):
                if member is not failed and not member._removed:
                    await self._stop_instance(member)
                    member._set_state(ChildState.RESTARTING)
            await trio.sleep(delay)
            for member in group:
                if member._removed:
                    continue
                if member.spec.restart is Restart.TEMPORARY and member is not failed:
                    # OTP: a temporary child is never restarted, even for a sibling.
                    self._children.pop(member.spec.name, None)
                    member._set_state(ChildState.STOPPED)
                    continue
                if not await self._start_again(member):
                    return  # that failure scheduled a new group restart

    async def _start_again(self, child: ChildHandle[Any]) -> bool:
        """Start a new instance; a start failure counts as a crash. True if it came up."""
        child._set_state(ChildState.STARTING)
        try:
            await self._nursery.start(self._run_instance, child)
        except Exception as exc:
            self._instance_ended(child, exc)
            return False
        return True

    # -- stopping ---------------------------------------------------------------------------

    async def _stop_instance(self, child: ChildHandle[Any]) -> None:
        """The shutdown protocol for one child; returns once the instance has ended."""
        if not child._live:
            # Still starting (not shielded yet, so this ends it) or already ended.
            child._scope.cancel()
            return
        child._stopping = True
        child._set_state(ChildState.STOPPING)
        exited, scope, value = child._exited, child._scope, child._value
        timeout = child.spec.shutdown_timeout
        # Duck-typed: a runtime-checkable Protocol costs ~10 us per check, per child.
        request_stop = getattr(value, "request_stop", None)
        if callable(request_stop):
            request_stop()
        else:
            scope.cancel()
        with trio.move_on_after(timeout):
            await exited.wait()
        if not exited.is_set():
            logger.warning(
                "%s: %s did not stop within %ss; cancelling it", self.name, child.spec.name, timeout
            )
            scope.cancel()
            # A child that shields itself cannot be interrupted by anyone in trio; waiting
            # keeps the stop order (and the nursery would wait for it anyway).
            await exited.wait()

    async def _shutdown(self) -> None:
        if self._state is _SupState.RUNNING:
            self._state = _SupState.STOPPING
        for child in reversed(list(self._children.values())):
            if child._pending is not None:
                child._pending.cancel()
            await self._stop_instance(child)
            # Set even when unchanged (FAILED), so every get_or_start waiter wakes.
            child._set_state(
                ChildState.FAILED if child._state is ChildState.FAILED else ChildState.STOPPED
            )
        if self._state is _SupState.STOPPING:
            self._state = _SupState.STOPPED


@asynccontextmanager
async def open_supervisor(
    *,
    name: str,
    strategy: Strategy = Strategy.ONE_FOR_ONE,
    max_restarts: int = 3,
    period: float = 5.0,
    backoff: Backoff = Backoff(),  # noqa: B008 - frozen, so sharing the default is safe
) -> AsyncIterator[Supervisor]:
    """Open a supervisor that lives as long as the ``async with`` body.

    Children are started with ``await sup.start_child(spec)`` and restarted by their
    restart type and ``strategy``, after a :class:`Backoff` delay. More than
    ``max_restarts`` restarts within ``period`` seconds (by ``trio.current_time``) is an
    escalation: the body is cancelled, the children are stopped, and the ``async with``
    raises SupervisorEscalation.

    When the body ends (returns, raises or is cancelled) the children are stopped in the
    reverse of their start order, each by the shutdown protocol: a child whose started value
    has ``request_stop()`` (an actor) is asked to stop gracefully, any other child is
    cancelled (trio's own graceful path: its ``finally`` blocks run); a child still running
    ``shutdown_timeout`` seconds later is cancelled. A child that shields itself from that
    cancellation cannot be interrupted by anyone in trio: the supervisor logs a warning and
    waits for it, keeping the order. Children's scopes are shielded from the supervisor's
    own cancellation, so an outside cancel also stops them in order.

    A body error propagates unchanged once the children are stopped.
    """
    if max_restarts < 0 or period <= 0:
        raise ValueError("max_restarts must be >= 0 and period > 0")
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(
            name=name,
            strategy=strategy,
            max_restarts=max_restarts,
            period=period,
            backoff=backoff,
            nursery=nursery,
        )
        try:
            yield supervisor
        except Exception as exc:
            body_error = exc
        finally:
            # Pending restarts die with the nursery's cancellation; children are shielded.
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await supervisor._shutdown()
    if body_error is not None:
        raise body_error
    if supervisor._escalation is not None:
        raise supervisor._escalation


def actor_spec(
    name: str,
    make: Callable[[], A],
    *,
    restart: Restart = Restart.PERMANENT,
    shutdown_timeout: float = 5.0,
) -> ChildSpec[A]:
    """A child spec that runs a fresh process from ``make()`` (an actor) on every
    (re)start; the child's value is that process."""

    def run_actor(*, task_status: trio.TaskStatus[A]) -> Awaitable[None]:
        # A plain function returning run()'s coroutine: no extra frame per idle actor.
        return make().run(task_status=task_status)

    return ChildSpec(name, run_actor, restart=restart, shutdown_timeout=shutdown_timeout)


def supervisor_spec(
    name: str,
    *children: ChildSpec[Any],
    strategy: Strategy = Strategy.ONE_FOR_ONE,
    max_restarts: int = 3,
    period: float = 5.0,
    backoff: Backoff = Backoff(),  # noqa: B008 - frozen, so sharing the default is safe
    restart: Restart = Restart.PERMANENT,
    shutdown_timeout: float = math.inf,
) -> ChildSpec[Supervisor]:
    """A child spec for a nested supervisor that starts ``children`` in order; the child's
    value is the :class:`Supervisor`. Its escalation is a failure its parent handles by its
    own policy. ``shutdown_timeout`` defaults to infinity (as in OTP): the subtree stops
    within its own children's timeouts."""

    async def run_supervisor(
        *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_supervisor(
            name=name, strategy=strategy, max_restarts=max_restarts, period=period, backoff=backoff
        ) as supervisor:
            for spec in children:
                await supervisor.start_child(spec)
            task_status.started(supervisor)
            await trio.sleep_forever()

    return ChildSpec(
        name, run_supervisor, restart=restart, shutdown_timeout=shutdown_timeout, kind="supervisor"
    )


def _supervised(value: object) -> Supervised | None:
    """``value`` if it is a ``Supervised`` process (duck-typed, as in ``_stop_instance``)."""
    if hasattr(value, "alive") and hasattr(value, "statistics"):
        return cast(Supervised, value)
    return None


def _is_alive(value: object) -> bool:
    process = _supervised(value)
    return process is None or process.alive


def _child_snapshot(child: ChildHandle[Any], now: float) -> ChildSnapshot:
    running = child._state is ChildState.RUNNING
    value = child._value
    process = _supervised(value)
    return ChildSnapshot(
        name=child.spec.name,
        kind=child.spec.kind,
        restart=str(child.spec.restart),
        state=str(child._state),
        restart_count=child._restart_count,
        escalation_count=child._escalation_count,
        last_failure=child._last_failure,
        uptime=now - child._started_at if running and child._started_at is not None else None,
        mailbox_depth=None if process is None else process.statistics().mailbox_depth,
        supervisor=value.snapshot() if running and isinstance(value, Supervisor) else None,
        detail=_detail(value) if running else None,
    )


def _detail(value: object) -> dict[str, Any] | None:
    describe = getattr(value, "snapshot_detail", None)
    return describe() if callable(describe) else None
