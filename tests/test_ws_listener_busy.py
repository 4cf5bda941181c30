"""Near its open-file limit the listener refuses new connections with a 503, and
``run.py`` serves up to the hard limit.

Every WebSocket is an open file; past ``limit - reserve`` open files the listener answers
the upgrade with 503 ``server_busy`` and ``Retry-After`` (the connections it holds are
untouched) instead of running ``accept`` into EMFILE, and accepts again once files are
freed. The limit here is a knob (``OpenFiles``) set just above what the test process
holds, and, in a subprocess, a real low soft limit.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from test_ws_listener import Listener, Peer, start_listener
from wsproto.events import AcceptConnection, RejectConnection, RejectData

from atrium.http.ws_listener import RETRY_AFTER_SECONDS, OpenFiles

CAP = 10.0
BUSY_BODY = (
    b'{"error":{"code":"server_busy",'
    b'"message":"This server holds all the connections it can; retry later"}}'
)


def open_file_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        await peer.aclose()


async def connect(listener: Listener, peers: list[Peer]) -> Peer:
    peer = await Peer.connect(listener.port)
    peers.append(peer)
    return peer


async def assert_busy(peer: Peer) -> None:
    reply = await peer.upgrade()
    assert isinstance(reply, RejectConnection) and reply.status_code == 503
    headers = dict(reply.headers)
    assert headers[b"retry-after"] == str(RETRY_AFTER_SECONDS).encode()
    assert headers[b"content-type"] == b"application/json"
    body = await peer.event()
    assert isinstance(body, RejectData) and body.data == BUSY_BODY
    assert await peer.eof() == b""  # and the socket is closed: its file is free again


async def test_past_the_limit_every_upgrade_is_a_503_server_busy(
    nursery: trio.Nursery, peers: list[Peer]
) -> None:
    files = OpenFiles(limit=open_file_count(), reserve=1)
    listener = await start_listener(nursery, open_files=files)
    for _ in range(3):
        await assert_busy(await connect(listener, peers))
    assert listener.sessions.failures.counts()["connection"] == 0
    assert listener.sessions.accepted.statistics().current_buffer_used == 0  # no session


async def test_connections_are_refused_near_the_limit_and_accepted_once_files_free(
    nursery: trio.Nursery, peers: list[Peer]
) -> None:
    # Room for a few more files past what is open now: each connection here is two (the
    # test's end and the listener's), the listener's count alone allows 7.
    files = OpenFiles(limit=open_file_count() + 11, reserve=4)
    listener = await start_listener(nursery, open_files=files)
    held = []
    with trio.fail_after(CAP):
        while True:
            peer = await connect(listener, peers)
            reply = await peer.upgrade()
            if isinstance(reply, RejectConnection):
                assert reply.status_code == 503
                break
            assert isinstance(reply, AcceptConnection)
            held.append(await listener.next())
    assert 1 <= len(held) <= 8
    # The connections it holds are served as before.
    held[0].conn.try_send("still here")
    assert await peers[0].message() == "still here"
    # Freed files (the listener closes its ends, which the peers see): accepted again.
    for served, peer in zip(held, peers, strict=False):
        served.done.set()
        assert await peer.eof() == b""
    assert files.held == 0
    peer = await connect(listener, peers)
    assert isinstance(await peer.upgrade(), AcceptConnection)
    (await listener.next()).done.set()


_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from atrium.runtime.limits import raise_open_files
limits = raise_open_files()
print(limits.soft_before, limits.soft, limits.hard, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit here is too low to lower the soft one below it")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=60
    )
    before, soft, reported_hard, now_soft, now_hard = map(int, done.stdout.split())
    assert before == 256
    assert soft == now_soft == (1_048_576 if hard == resource.RLIM_INFINITY else hard)
    assert reported_hard == now_hard == hard
