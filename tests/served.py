"""``python run.py serve`` as a subprocess, and where it listens (for tests that kill,
signal or restart a whole server process)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import trio

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-key-with-enough-length-0123456789"


def run_py_env(data_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a ``run.py`` subprocess in a test: this process's, with the
    suite's key, ``data_dir``, ``database_url``, every port 0 (any free one) and rate limits
    no test reaches; ``settings`` are added or replace any of these."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "SECRET_KEY")}
    env.update(
        ENVIRONMENT="test",
        SECRET_KEY=SECRET,
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        PORT="0",
        WS_PORT="0",
        METRICS_PORT="0",
        RATE_LIMIT_PER_MINUTE="10000",
        AUTH_RATE_LIMIT_PER_MINUTE="10000",
    )
    env.update(settings)
    return env


@dataclass(frozen=True)
class Served:
    process: trio.Process
    url: str  # http://host:port of the API
    ws_port: int  # the dedicated WebSocket listener (start it with WS_PORT set)


async def start_serving(
    nursery: trio.Nursery,
    env: dict[str, str],
    *,
    stderr: int | IO[bytes],
    args: tuple[str, ...] = ("serve",),
) -> Served:
    """Start ``run.py serve`` (or ``run.py *args``) with ``env`` in ``nursery`` and wait
    (at most 60 s) until it has printed where its API and WebSocket listener are."""
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, str(ROOT / "run.py"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            check=False,
        )
    )
    assert process.stdout is not None
    out = b""
    with trio.fail_after(60):
        while b"WebSocket listener on " not in out or not out.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            assert chunk, "server exited before listening"
            out += chunk
    url = out.split(b"API on ")[1].split()[0].decode()
    # "WebSocket listener on ws://HOST:PORT/ws/"
    listener = out.split(b"WebSocket listener on ")[1].split()[0]
    ws_port = int(listener.rsplit(b":", 1)[1].removesuffix(b"/ws/"))
    return Served(process, url, ws_port)
