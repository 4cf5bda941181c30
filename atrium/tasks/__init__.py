"""Tasks that background jobs run: a registry of named tasks and the built-ins."""

from . import builtin as builtin
from ._registry import InvalidPayload as InvalidPayload
from ._registry import PermanentJobError as PermanentJobError
from ._registry import Task as Task
from ._registry import TaskContext as TaskContext
from ._registry import TaskRegistry as TaskRegistry
from ._registry import UnknownTask as UnknownTask
from ._registry import load_task_modules as load_task_modules
from ._registry import registry as registry
