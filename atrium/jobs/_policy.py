"""How long a failed job waits before its next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter between the attempts of a job.

    After the n-th failed attempt (n >= 1) the job waits
    ``min(maximum, base * 2 ** (n - 1))`` seconds times a factor drawn uniformly from
    ``[1 - jitter, 1]``: jobs that failed together (an outage) do not all come back at
    the same moment. ``random`` is injectable so tests can pin the schedule.
    """

    base: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.5
    random: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.base < 0 or self.maximum < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("retry policy needs base >= 0, maximum >= 0 and 0 <= jitter <= 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        delay = min(self.maximum, self.base * 2.0 ** min(max(failures, 1) - 1, 60))
        return delay * (1 - self.jitter * self.random())
