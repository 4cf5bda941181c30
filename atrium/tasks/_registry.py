"""Named tasks: what a job runs, with the schema its payload must match."""

from __future__ import annotations

import importlib
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pydantic
import trio

from ..persistence.database import Database

P = TypeVar("P", bound=pydantic.BaseModel)
T = TypeVar("T")


class PermanentJobError(Exception):
    """Raised by a task when trying again cannot help (malformed input, say): the job goes
    straight to ``dead`` with this message as its error."""


class UnknownTask(LookupError):
    """No task is registered under that name."""


class InvalidPayload(ValueError):
    """A payload does not match its task's schema; ``field`` names the first bad one
    (dotted, under ``payload``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TaskContext:
    """What a running task may use: who runs it and where, the database, progress
    reports, and a worker process for CPU-heavy steps."""

    def __init__(
        self,
        *,
        job_id: uuid.UUID,
        user_id: uuid.UUID,
        project_id: uuid.UUID | None,
        attempt: int,
        db: Database,
        report: Callable[[int, str | None], None],
        run_sync: Callable[..., Awaitable[Any]],
    ) -> None:
        self.job_id = job_id
        self.user_id = user_id
        self.project_id = project_id
        self.attempt = attempt
        """1 for the first attempt that counted, 2 for the first retry, and so on."""
        self.db = db
        self._report = report
        self._run_sync = run_sync

    async def progress(self, percent: int, message: str | None = None) -> None:
        """Report progress (0-100, clamped) with an optional message. Cheap to call
        often: reports are coalesced, and the job's row and its project's live workspace
        see the latest a few times a second at most."""
        self._report(max(0, min(100, int(percent))), message)
        await trio.lowlevel.checkpoint()

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a job worker process, off the event loop and its GIL: the
        result, or what ``fn`` raised. ``fn`` and ``args`` are pickled, so ``fn`` must be
        an importable top-level function (not a lambda, closure or method of a local).

        When the job times out or is cancelled, the process is killed: its CPU use ends
        at once. Raises PermanentJobError when the process dies or runs out of memory
        (JOB_WORKER_MEMORY_MB): the job ends ``dead``, since a retry would hit it again."""
        result: T = await self._run_sync(fn, *args)
        return result

    to_thread = run_sync
    """The former name of :meth:`run_sync` (it ran ``fn`` in a thread that could not be
    stopped); task modules written for it now get a worker process as well."""


TaskFn = Callable[[TaskContext, P], Awaitable[Any]]
"""A task's body: ``async def fn(ctx, payload) -> result`` (JSON-ready)."""


@dataclass(frozen=True, slots=True)
class Task(Generic[P]):
    """A registered task."""

    name: str
    description: str
    payload: type[P]
    run: TaskFn[P]
    needs_project: bool = False
    """Submissions must name a ``project_id`` (the task works on that project)."""

    def payload_schema(self) -> dict[str, Any]:
        return self.payload.model_json_schema()


class TaskRegistry:
    """Tasks by name. ``atrium.tasks.registry`` is the process's; tests may build others."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any]] = {}

    def task(
        self, name: str, payload: type[P], *, needs_project: bool = False
    ) -> Callable[[TaskFn[P]], TaskFn[P]]:
        """Decorator: register an ``async def fn(ctx, payload)`` as task ``name``; its
        docstring is the description ``GET /api/v1/jobs/tasks`` shows. Raises ValueError
        for a name already taken."""

        def register(fn: TaskFn[P]) -> TaskFn[P]:
            if name in self._tasks:
                raise ValueError(f"a task named {name!r} is already registered")
            doc = inspect.cleandoc(fn.__doc__ or "")
            self._tasks[name] = Task(name, doc, payload, fn, needs_project)
            return fn

        return register

    def get(self, name: str) -> Task[Any]:
        """The task named ``name``. Raises UnknownTask."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(name) from None

    def validate(self, name: str, payload: Any) -> pydantic.BaseModel:
        """The payload parsed by the task's schema. Raises UnknownTask, InvalidPayload."""
        task = self.get(name)
        try:
            parsed: pydantic.BaseModel = task.payload.model_validate(payload)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(["payload", *(str(p) for p in first.get("loc", ()))])
            raise InvalidPayload(where, first.get("msg", "is invalid")) from None
        return parsed

    def __iter__(self) -> Iterator[Task[Any]]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __contains__(self, name: object) -> bool:
        return name in self._tasks


registry = TaskRegistry()
"""The tasks this process runs: the built-ins, plus those of JOB_TASK_MODULES."""


def load_task_modules(names: tuple[str, ...]) -> None:
    """Import each module (once); importing one registers its tasks into ``registry``."""
    for name in names:
        importlib.import_module(name)
