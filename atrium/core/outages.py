"""The database's outage, as every layer names it: weather, not a bug.

``atrium.persistence.database`` raises these; HTTP answers them with 503
``database_unavailable``, WebSockets with 1013, and background work waits them out.
"""

from __future__ import annotations

import trio


class DatabaseUnavailable(Exception):
    """The database cannot be reached now: refused, reset or shut down, a connection lost
    mid-query, or a server still starting. Weather, not a bug: callers refuse the work
    (HTTP 503, WebSocket 1013) and the pool reconnects on its own once the server is back.
    The asyncpg (or OS) error is kept as ``__cause__``."""


class DatabaseTimeout(DatabaseUnavailable, trio.TooSlowError):
    """No answer within QUERY_TIMEOUT. Also a ``trio.TooSlowError``: a query that never
    answers and a server that cannot be reached look the same from here."""
