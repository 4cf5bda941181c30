"""Background jobs: the job actors, their supervisor, and the application service."""

from ._actor import JobActor as JobActor
from ._events import JobEvents as JobEvents
from ._policy import RetryPolicy as RetryPolicy
from ._queue import JobObserver as JobObserver
from ._queue import JobQueue as JobQueue
from ._queue import JobSettings as JobSettings
from ._service import JobService as JobService
from ._tree import Reaper as Reaper
from ._tree import jobs_spec as jobs_spec
