"""OTP-style supervision for trio: supervisors, child specs, restart policy, snapshots."""

from ._errors import ChildExists as ChildExists
from ._errors import NoSuchChild as NoSuchChild
from ._errors import SupervisionError as SupervisionError
from ._errors import SupervisorEscalation as SupervisorEscalation
from ._errors import SupervisorStopped as SupervisorStopped
from ._protocol import MailboxStatistics as MailboxStatistics
from ._protocol import Runnable as Runnable
from ._protocol import Stoppable as Stoppable
from ._protocol import Supervised as Supervised
from ._snapshot import ChildSnapshot as ChildSnapshot
from ._snapshot import FailureInfo as FailureInfo
from ._snapshot import SupervisorSnapshot as SupervisorSnapshot
from ._spec import Backoff as Backoff
from ._spec import ChildFactory as ChildFactory
from ._spec import ChildSpec as ChildSpec
from ._spec import Restart as Restart
from ._spec import Strategy as Strategy
from ._supervisor import ChildHandle as ChildHandle
from ._supervisor import ChildState as ChildState
from ._supervisor import Supervisor as Supervisor
from ._supervisor import actor_spec as actor_spec
from ._supervisor import open_supervisor as open_supervisor
from ._supervisor import supervisor_spec as supervisor_spec
