"""An embedded PostgreSQL server (pgserver) for when no DATABASE_URL is given."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# PostgreSQL's Unix socket path must fit in ~107 bytes; pgserver puts it in the data
# directory, so a deep data directory gets a short symlink under the temp dir.
_MAX_SOCKET_DIR = 80


def _short_path(pgdata: Path) -> Path:
    if len(str(pgdata)) <= _MAX_SOCKET_DIR:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    link = Path(tempfile.gettempdir()) / f"atrium-pg-{digest}"
    if not link.is_symlink():
        link.symlink_to(pgdata, target_is_directory=True)
    return link


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) PostgreSQL with its data in ``data_dir/pg``; yield its URL.

    The data survives a restart; the server stops when the block ends.
    """
    pgdata = (data_dir / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (servers, CI); harmless.
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(_short_path(pgdata), cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
