"""Actors started on first use, one per key, under one supervisor: what the registries of
workspaces (one per project) and of live documents (one per document) share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import trio

from ..actors import Actor
from ..supervision import NoSuchChild, Restart, Strategy, Supervisor, actor_spec, open_supervisor

A = TypeVar("A", bound="Actor[Any, Any]")


class OnDemand(Generic[A]):
    """The actors of one ``kind``, each named ``{prefix}:{key}`` under the supervisor
    ``name`` that ``open`` runs. ``get`` starts one on first use (never two) and waits
    while the supervisor (re)starts; ``find`` and ``running`` never wait and never start
    one."""

    __slots__ = ("_name", "_prefix", "_kind", "_max_restarts", "_period", "_supervisor", "_up")

    def __init__(
        self, name: str, prefix: str, kind: type[A], *, max_restarts: int, period: float
    ) -> None:
        self._name = name
        self._prefix = prefix
        self._kind = kind
        self._max_restarts = max_restarts
        self._period = period
        self._supervisor: Supervisor | None = None
        self._up = trio.Event()

    @property
    def supervisor(self) -> Supervisor | None:
        """The supervisor while ``open`` runs it, else None."""
        return self._supervisor

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Supervisor]:
        """Run the supervisor (one_for_one; ``max_restarts`` in ``period`` seconds, else
        it escalates) and serve ``get`` from it for the block."""
        async with open_supervisor(
            name=self._name,
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=self._max_restarts,
            period=self._period,
        ) as supervisor:
            self._supervisor = supervisor
            self._up.set()
            try:
                yield supervisor
            finally:
                self._supervisor = None
                self._up = trio.Event()

    async def get(self, key: object, make: Callable[[], A]) -> A:
        """The running actor of ``key``, started from ``make()`` (restarted when it
        crashes, not when it stops) if there is none. A value may stop at any moment
        afterwards: on ActorStopped, call again."""
        spec = actor_spec(f"{self._prefix}:{key}", make, restart=Restart.TRANSIENT)
        while (supervisor := self._supervisor) is None:
            await self._up.wait()
        return await supervisor.get_or_start(spec)

    def find(self, key: object) -> A | None:
        """The actor of ``key`` if one is running now."""
        supervisor = self._supervisor
        if supervisor is None:
            return None
        try:
            value = supervisor.child(f"{self._prefix}:{key}").value
        except NoSuchChild:
            return None
        return value if isinstance(value, self._kind) and value.alive else None

    def running(self) -> list[A]:
        """The actors running now (a snapshot)."""
        supervisor = self._supervisor
        if supervisor is None:
            return []
        kind = self._kind
        return [
            child.value
            for child in supervisor.which_children()
            if isinstance(child.value, kind) and child.value.alive
        ]
