"""The actor runtime: trio tasks that own their state, reached through bounded mailboxes."""

from ._actor import Actor as Actor
from ._actor import ActorStatistics as ActorStatistics
from ._errors import ActorError as ActorError
from ._errors import ActorStopped as ActorStopped
from ._errors import AskTimeout as AskTimeout
from ._errors import MailboxFull as MailboxFull
