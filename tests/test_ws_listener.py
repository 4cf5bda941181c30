"""The dedicated listener as a transport: handshake, frames in, the direct write, close.

A real listener (``serve_listener``) on port 0, driven from the other end by raw sockets
speaking wsproto's client side. In place of ``Realtime`` a stand-in hands each accepted
connection to the test, which then plays the session: so the direct write's branches
(socket free, gate taken, socket full, connection closing) happen exactly when a test says.
The same listener under the real sessions is covered by the suites run on both transports.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from atrium.core.failures import ContainedFailures
from atrium.domain.realtime import ConnectionGone, DirectWrite, Handshake
from atrium.http.ws import AsgiConnection
from atrium.http.ws_listener import (
    CLOSE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    ListenerConnection,
    serve_listener,
    text_frame,
)
from atrium.realtime.outbox import PARTIAL, REFUSED, SENT

MAX_MESSAGE = 1024
CAP = 10.0  # seconds: no test here waits on anything but an event


@dataclass
class Served:
    """One connection the listener accepted, held open until ``done`` is set."""

    conn: ListenerConnection
    handshake: Handshake
    done: trio.Event = field(default_factory=trio.Event)


class Sessions:
    """Stands in for ``Realtime``: each accepted connection goes to the test."""

    def __init__(self) -> None:
        self.failures = ContainedFailures()
        self._send, self.accepted = trio.open_memory_channel[Served](10)

    async def serve(
        self, conn: ListenerConnection, handshake: Handshake, *, transport: str
    ) -> None:
        assert transport == "listener"
        served = Served(conn, handshake)
        await self._send.send(served)
        await served.done.wait()


@dataclass
class Listener:
    port: int
    sessions: Sessions

    async def next(self) -> Served:
        with trio.fail_after(CAP):
            return await self.sessions.accepted.receive()


async def start_listener(nursery: trio.Nursery, **options: Any) -> Listener:
    """A listener on port 0 in ``nursery``, with sessions of its own; ``options`` go to
    ``serve_listener``."""
    sessions = Sessions()
    port = await nursery.start(
        lambda task_status: serve_listener(
            sessions,
            "127.0.0.1",
            0,
            max_message_size=MAX_MESSAGE,
            task_status=task_status,
            **options,
        )
    )
    return Listener(port, sessions)


@pytest.fixture
async def listener(nursery: trio.Nursery) -> Listener:
    return await start_listener(nursery)


class Peer:
    """A client over a raw socket: wsproto's client side, frames in and out by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Peer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def upgrade(
        self, target: str = "/ws/p1", headers: list[tuple[bytes, bytes]] | None = None
    ) -> Event:
        """Send the upgrade request; the server's answer (accepted or rejected)."""
        await self.send(Request(host="test", target=target, extra_headers=headers or []))
        return await self.event()

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def event(self) -> Event:
        """The next event from the server (a CloseConnection with 1006 when it hangs up)."""
        with trio.fail_after(CAP):
            while True:
                for event in self.ws.events():
                    return event
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)

    async def message(self) -> str | bytes:
        """The next whole message (wsproto hands a long one over in parts)."""
        parts = []
        while True:
            event = await self.event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def eof(self) -> bytes:
        """Everything the server still sends, up to its TCP close."""
        received = b""
        with trio.fail_after(CAP):
            while chunk := await self.stream.receive_some(65536):
                received += chunk
        return received

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def peer(listener: Listener) -> AsyncIterator[Peer]:
    peer = await Peer.connect(listener.port)
    yield peer
    await peer.aclose()


async def accepted(listener: Listener, peer: Peer, target: str = "/ws/p1") -> Served:
    assert isinstance(await peer.upgrade(target), AcceptConnection)
    return await listener.next()


async def fill(served: Served, frame: str) -> int:
    """try_send ``frame`` until the socket is full; how many went whole (the last one
    is PARTIAL)."""
    for sent in range(100_000):
        outcome = served.conn.try_send(frame)
        if outcome == PARTIAL:
            return sent
        assert outcome == SENT
    raise AssertionError("the socket never filled")


def reset(peer: Peer) -> None:
    """Make the peer's close a reset (SO_LINGER 0), as a crashed client's kernel would."""
    peer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def read_frames(peer: Peer, count: int) -> list[str | bytes]:
    return [await peer.message() for _ in range(count)]


# -- the opening handshake ------------------------------------------------------------------


async def test_upgrade_hands_the_request_to_the_session(listener: Listener, peer: Peer) -> None:
    headers = [
        (b"Origin", b"http://app.test"),
        (b"Authorization", b"Bearer abc"),
        (b"X-Other", b"1"),
    ]
    assert isinstance(
        await peer.upgrade("/ws/p1/u2?since_seq=3&batch=1", headers), AcceptConnection
    )
    served = await listener.next()
    assert served.handshake == Handshake(
        "p1",
        "u2",
        {"since_seq": "3", "batch": "1"},
        {"origin": "http://app.test", "authorization": "Bearer abc"},
    )
    assert isinstance(served.conn, DirectWrite)
    assert not issubclass(AsgiConnection, DirectWrite)  # the main port queues every frame
    served.done.set()


async def test_unknown_path_is_a_404_in_the_error_shape(listener: Listener, peer: Peer) -> None:
    reply = await peer.upgrade("/api/v1/projects")
    assert isinstance(reply, RejectConnection) and reply.status_code == 404
    body = await peer.event()
    assert isinstance(body, RejectData)
    assert (
        body.data
        == b'{"error":{"code":"not_found","message":"No WebSocket endpoint at this path"}}'
    )
    assert await peer.eof() == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00" * 100 + b"\r\n\r\n",
        b"GET /ws/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",  # no Connection: Upgrade
        b"GET /ws/p1 HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ],
)
async def test_malformed_upgrade_is_a_400(
    listener: Listener, peer: Peer, request_bytes: bytes
) -> None:
    await peer.stream.send_all(request_bytes)
    answer = await peer.eof()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert listener.sessions.failures.counts()["connection"] == 0


async def test_a_client_that_never_upgrades_is_dropped(
    listener: Listener, peer: Peer, mock_clock: trio.testing.MockClock
) -> None:
    await peer.stream.send_all(b"GET /ws/p1 HTTP/1.1\r\n")  # and then nothing
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(HANDSHAKE_TIMEOUT)
    assert await peer.eof() == b""


async def test_a_client_that_leaves_during_the_upgrade_costs_nothing(listener: Listener) -> None:
    for _ in range(3):
        peer = await Peer.connect(listener.port)
        await peer.stream.send_all(b"GET /ws/p1 HTTP/1.1\r\n")
        await peer.aclose()
    # A whole request, then a reset before the answer: the 101 meets a dead socket.
    peer = await Peer.connect(listener.port)
    await peer.send(Request(host="test", target="/ws/p1"))
    reset(peer)
    await peer.aclose()
    peer = await Peer.connect(listener.port)
    served = await accepted(listener, peer)  # still serving
    served.done.set()
    await peer.aclose()


# -- frames in ------------------------------------------------------------------------------


async def test_messages_in_text_binary_and_fragments(listener: Listener, peer: Peer) -> None:
    served = await accepted(listener, peer)
    await peer.send(TextMessage("hello"))
    await peer.send(BytesMessage(b"\x00\x01"))
    await peer.send(TextMessage("frag", message_finished=False))
    await peer.send(TextMessage("mented"))
    await peer.send(BytesMessage(b"ab", message_finished=False))
    await peer.send(BytesMessage(b"cd"))
    with trio.fail_after(CAP):
        received = [await served.conn.receive() for _ in range(4)]
    assert received == ["hello", b"\x00\x01", "fragmented", b"abcd"]
    served.done.set()


async def test_frames_split_across_reads_and_a_ping_between_them(
    listener: Listener, peer: Peer
) -> None:
    # Simple frames are read without wsproto until the first other one (the ping, in the
    # middle of one write): from there wsproto reads the rest of the same bytes.
    served = await accepted(listener, peer)
    medium = "m" * 300  # a 16-bit length
    data = peer.ws.send(TextMessage("a")) + peer.ws.send(BytesMessage(b"\x00" * 200))
    data += peer.ws.send(TextMessage(medium))
    for i in range(len(data)):  # a byte at a time
        await peer.stream.send_all(data[i : i + 1])
    await peer.stream.send_all(
        peer.ws.send(TextMessage("b")) + peer.ws.send(Ping(b"p")) + peer.ws.send(TextMessage("c"))
    )
    with trio.fail_after(CAP):
        received = [await served.conn.receive() for _ in range(5)]
    assert received == ["a", b"\x00" * 200, medium, "b", "c"]
    assert await peer.event() == Pong(b"p")
    served.done.set()


async def test_ping_is_answered_with_its_payload(listener: Listener, peer: Peer) -> None:
    served = await accepted(listener, peer)
    await peer.send(Ping(b"are you there"))
    await peer.send(Pong(b"unasked"))  # allowed, and ignored
    await peer.send(TextMessage("after"))
    with trio.fail_after(CAP):
        assert await served.conn.receive() == "after"
    assert await peer.event() == Pong(b"are you there")
    served.done.set()


@pytest.mark.parametrize(
    "frames",
    [
        [TextMessage("x" * (MAX_MESSAGE + 1))],
        [BytesMessage(b"x" * 600, message_finished=False), BytesMessage(b"y" * 600)],
    ],
)
async def test_oversize_message_closes_with_1009(
    listener: Listener, peer: Peer, frames: list[Event]
) -> None:
    served = await accepted(listener, peer)
    for frame in frames:
        await peer.send(frame)
    with trio.fail_after(CAP), pytest.raises(ConnectionGone):
        await served.conn.receive()
    closed = await peer.event()
    assert closed == CloseConnection(1009, "message_too_big")
    await peer.send(closed.response())
    served.done.set()
    assert await peer.eof() == b""  # the listener waited for our answer, then closed


async def test_text_that_is_not_utf8_closes_with_1007(listener: Listener, peer: Peer) -> None:
    served = await accepted(listener, peer)
    await peer.stream.send_all(
        b"\x81\x83abcd" + bytes(b ^ m for b, m in zip(b"\xff\xfe\xfd", b"abc", strict=True))
    )
    with trio.fail_after(CAP), pytest.raises(ConnectionGone):
        await served.conn.receive()
    closed = await peer.event()
    assert isinstance(closed, CloseConnection) and closed.code == 1007
    await peer.send(closed.response())
    served.done.set()
    assert await peer.eof() == b""


async def test_peer_close_is_answered_and_ends_the_connection(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    await peer.send(CloseConnection(1000, "bye"))
    with trio.fail_after(CAP), pytest.raises(ConnectionGone):
        await served.conn.receive()
    assert await peer.event() == CloseConnection(1000, "bye")
    assert served.conn.try_send("late") == REFUSED
    with pytest.raises(ConnectionGone):
        await served.conn.send("late")
    served.done.set()
    assert await peer.eof() == b""


async def test_peer_that_hangs_up_is_gone(listener: Listener, peer: Peer) -> None:
    served = await accepted(listener, peer)
    await peer.aclose()
    with trio.fail_after(CAP), pytest.raises(ConnectionGone):
        await served.conn.receive()
    assert served.conn.try_send("late") == REFUSED
    served.done.set()


# -- the direct write -----------------------------------------------------------------------


async def test_direct_write_lands_whole_and_in_order_with_queued_sends(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    assert served.conn.try_send("one") == SENT
    await served.conn.send("two")
    long = "é" * 40_000  # 80 KB: the 8-byte length form
    assert served.conn.try_send(long) in (SENT, PARTIAL)
    await served.conn.flush()
    assert served.conn.try_send("x" * 200) == SENT  # the 2-byte length form
    assert await read_frames(peer, 4) == ["one", "two", long, "x" * 200]
    served.done.set()


async def test_direct_write_to_a_full_socket_is_partial_and_owed(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    frame = "f" * 60_000
    whole = await fill(served, frame)
    # Something is owed: nothing more goes direct, so frames cannot interleave.
    assert served.conn.try_send("next") == REFUSED
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.flush)
        assert await read_frames(peer, whole + 1) == [frame] * (whole + 1)
    assert served.conn.try_send("next") == SENT
    assert await peer.message() == "next"
    served.done.set()


async def test_direct_write_while_a_queued_send_waits_is_refused(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    frame = "q" * 60_000
    whole = await fill(served, frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.send, "queued")  # flushes what is owed, then waits
        await trio.testing.wait_all_tasks_blocked()
        assert served.conn.try_send("direct") == REFUSED  # the gate is taken
        received = await read_frames(peer, whole + 2)
    assert received == [frame] * (whole + 1) + ["queued"]
    served.done.set()


async def test_direct_write_to_a_reset_connection_is_refused(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    reset(peer)
    await peer.aclose()
    outcomes = {served.conn.try_send("into the void") for _ in range(3)}
    assert outcomes == {REFUSED}
    with pytest.raises(ConnectionGone):
        await served.conn.send("queued")
    with trio.fail_after(CAP), pytest.raises(ConnectionGone):
        await served.conn.receive()
    served.done.set()


# -- close ----------------------------------------------------------------------------------


async def test_close_sends_the_code_and_waits_for_the_answer(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    await served.conn.close(4008, "slow_consumer")
    assert served.conn.try_send("after close") == REFUSED
    with pytest.raises(ConnectionGone):
        await served.conn.send("after close")
    await served.conn.close(1000, "twice")  # idempotent: nothing more is sent
    closed = await peer.event()
    assert closed == CloseConnection(4008, "slow_consumer")
    served.done.set()
    await trio.testing.wait_all_tasks_blocked()
    await peer.send(closed.response())
    assert await peer.eof() == b""


async def test_close_finishes_a_partial_frame_first(listener: Listener, peer: Peer) -> None:
    served = await accepted(listener, peer)
    frame = "p" * 60_000
    whole = await fill(served, frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.close, 4001, "session_revoked")
        assert await read_frames(peer, whole + 1) == [frame] * (whole + 1)
        assert await peer.event() == CloseConnection(4001, "session_revoked")
    served.done.set()


async def test_a_peer_that_does_not_answer_the_close_is_dropped(
    listener: Listener, peer: Peer, mock_clock: trio.testing.MockClock
) -> None:
    served = await accepted(listener, peer)
    await served.conn.close(1012, "service_restart")
    served.done.set()
    assert await peer.event() == CloseConnection(1012, "service_restart")
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(CLOSE_TIMEOUT)
    assert await peer.eof() == b""


async def test_a_peer_that_cannot_take_the_close_frame_is_dropped(
    listener: Listener, peer: Peer, mock_clock: trio.testing.MockClock
) -> None:
    served = await accepted(listener, peer)
    frame = "s" * 60_000
    whole = await fill(served, frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.close, 4008, "slow_consumer")
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(CLOSE_TIMEOUT)  # the close frame never fit
    served.done.set()
    await trio.testing.wait_all_tasks_blocked()
    # Dropped without the close frame (a client sees 1006): what was sent whole, then
    # part of a frame, then the TCP close; never a torn frame followed by more.
    rest = await peer.eof()
    peer.ws.receive_data(rest)
    peer.ws.receive_data(None)
    events = list(peer.ws.events())
    assert sum(isinstance(e, TextMessage) and e.message_finished for e in events) == whole
    assert [e for e in events if isinstance(e, CloseConnection)] == [CloseConnection(1006)]


async def test_a_cancelled_send_leaves_the_rest_owed_not_torn(
    listener: Listener, peer: Peer
) -> None:
    served = await accepted(listener, peer)
    frame = "c" * 60_000
    whole = await fill(served, frame)
    with trio.move_on_after(0) as cancelled:
        await served.conn.send("never")  # the gate's checkpoint: cancelled before a byte
    assert cancelled.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.send, "second")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # mid-write: the rest stays owed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served.conn.send, "third")
        received = await read_frames(peer, whole + 3)
    assert received == [frame] * (whole + 1) + ["second", "third"]
    served.done.set()


def test_text_frame_lengths() -> None:
    assert text_frame("hi") == b"\x81\x02hi"
    assert text_frame("x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame("x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


async def test_a_port_in_use_fails_the_start_and_leaves_nothing_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await serve_listener(Sessions(), "127.0.0.1", port, max_message_size=MAX_MESSAGE)
