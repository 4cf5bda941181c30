"""Real Yjs clients for the tests: the npm ``yjs`` + ``y-websocket`` packages in Node.

``node_modules`` (a session fixture: import it into a test module) installs
tests/package-lock.json with ``npm ci`` when tests/node_modules is missing or older than
the lock; a file lock makes concurrent pytest-xdist workers install once. ``YClient``
runs ``tests/node/yclient.mjs`` (an unmodified ``WebsocketProvider``) as a subprocess and
talks to it in JSON lines.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

TESTS = Path(__file__).resolve().parent
CLIENT = TESTS / "node" / "yclient.mjs"
_LOCK = TESTS / "package-lock.json"
_INSTALLED = TESTS / "node_modules" / ".package-lock.json"  # written by npm ci


def _fresh() -> bool:
    return _INSTALLED.exists() and _INSTALLED.stat().st_mtime >= _LOCK.stat().st_mtime


def install_node_clients() -> None:
    """``npm ci --prefix tests`` unless tests/node_modules is already what the lock says.
    Safe when several processes call it at once (one installs, the others wait)."""
    if _fresh():
        return
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("Node and npm are needed for the real-client tests (tests/package.json)")
    key = hashlib.sha256(str(TESTS).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"atrium-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _fresh():
            subprocess.run(
                ["npm", "ci", "--prefix", str(TESTS), "--no-audit", "--no-fund"],
                check=True,
                capture_output=True,
                timeout=300,
            )


@pytest.fixture(scope="session")
def node_modules() -> Iterator[None]:
    """The Node test clients' packages, installed (see ``install_node_clients``)."""
    install_node_clients()
    yield


class YClient:
    """One Node process holding a ``Y.Doc`` synced by ``WebsocketProvider``.

    Every JSON line it prints is kept in ``events``, in order; ``wait_for`` waits for one
    (the caller's ``fail_after`` bounds the wait).
    """

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self._changed.set()
            self._changed = trio.Event()

    async def send(self, cmd: str, **fields: Any) -> int:
        """Send one command; returns the index of the next event (for ``wait_for``)."""
        mark = len(self.events)
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        return mark

    async def wait_for(
        self,
        event: str,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> dict[str, Any]:
        """The first ``event`` at index ``since`` or later that ``where`` accepts."""
        while True:
            for found in self.events[since:]:
                if found["event"] == event and where(found):
                    return found
            if self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited; its events: {self.events}")
            await self._changed.wait()

    async def ask(self, cmd: str, answer: str, **fields: Any) -> dict[str, Any]:
        """Send a command and wait for its ``answer`` event."""
        return await self.wait_for(answer, await self.send(cmd, **fields))

    async def text(self) -> str:
        return str((await self.ask("text", "text"))["text"])

    async def type(self, chars: str, delay_ms: int = 0) -> None:
        await self.ask("type", "typed", chars=chars, delay_ms=delay_ms)

    async def wait_contains(self, chars: str) -> str:
        return str((await self.ask("wait_contains", "text", chars=chars))["text"])

    async def wait_synced(self) -> None:
        await self.ask("wait_synced", "synced")

    def closes(self) -> list[tuple[int | None, str]]:
        """The close codes and reasons of its connections so far."""
        return [(e["code"], e["reason"]) for e in self.events if e["event"] == "close"]


@asynccontextmanager
async def open_yclient(
    nursery: trio.Nursery, url: str, room: str, ticket: str, name: str = "node"
) -> AsyncIterator[YClient]:
    """A running ``YClient`` for ``WebsocketProvider(url, room, doc, {params: {ticket}})``;
    killed on the way out."""
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            ["node", str(CLIENT), url, room, ticket, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            check=False,
        )
    )
    client = YClient(process, name)
    nursery.start_soon(client._read)
    try:
        yield client
    finally:
        process.kill()
