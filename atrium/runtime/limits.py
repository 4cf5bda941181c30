"""The process's open-file limit: raised to the hard limit at start.

Every WebSocket connection is an open file, so the soft ``RLIMIT_NOFILE`` (often 1,024) is
what caps a process's connections long before memory does. ``run.py`` raises the soft
limit to the hard one (which an unprivileged process cannot raise) and logs both; the
listener then refuses new connections with a 503 a margin below it
(``atrium.http.ws_listener``), so ``accept`` never runs out of files.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("atrium")


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-file limits before and after ``raise_open_files``."""

    soft_before: int
    soft: int
    hard: int


def raise_open_files() -> OpenFiles:
    """Raise the soft open-file limit to the hard limit (as far as the kernel allows);
    log and return both. Never raises: a limit that cannot be raised is kept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        # "unlimited" is capped by fs.nr_open; 1,048,576 is its usual value.
        wanted = 1_048_576
    raised = soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            raised = wanted
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d: %s", soft, error)
    limits = OpenFiles(soft_before=soft, soft=raised, hard=hard)
    log.info(
        "open-file limit: %s (soft, was %s; hard %s)",
        _shown(limits.soft),
        _shown(limits.soft_before),
        _shown(limits.hard),
    )
    return limits


def _shown(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
