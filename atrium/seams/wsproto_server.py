"""The wsproto side of the dedicated WebSocket listener, and the frames it writes itself.

Written against wsproto 1.3.2. Why: the listener (``atrium.http.ws_listener``) is a second
WebSocket server, over sockets it owns, for high fan-out: wsproto parses the opening
handshake and the frames that come in, but data frames going out are framed here
(:func:`text_frame`, :func:`binary_frame`) and written straight to the socket, with no
wsproto call per delivery. That is sound only while wsproto negotiates no extension (the
listener passes none to ``H11Handshake``/``Connection``, so a data frame is a header and
the payload) and only as long as these frames match what wsproto itself would send.

The frames that come in are mostly whole, small, masked text frames (a cursor move, a
PONG): :func:`client_frame` reads those, and the listener hands everything else (control
frames, fragments, reserved bits, text that is not UTF-8, a frame over the size limit) to
a wsproto ``Connection`` made then, which reads the rest of the stream. So an idle
connection holds no wsproto object, and its PONGs skip wsproto's parser.

Every wsproto name the listener uses is imported here, so this module is the one place an
upgrade of wsproto has to be checked against. The listener relies on (checked by
tests/test_seams.py): ``H11Handshake(ConnectionType.SERVER)`` with ``receive_data``,
``events`` and ``send``, rejecting a malformed request with ``RemoteProtocolError`` whose
``event_hint`` is a ``RejectConnection``; ``Connection(ConnectionType.SERVER)`` with
``receive_data``, ``events``, ``send`` and ``state`` (``ConnectionState.OPEN``,
``REMOTE_CLOSING``, ``LOCAL_CLOSING``); a parser failure reported as a ``CloseConnection``
event while the state is still ``OPEN``; ``Ping.response()`` and
``CloseConnection.response()``; ``TextMessage``/``BytesMessage`` with ``data`` and
``message_finished``; ``CloseReason.MESSAGE_TOO_BIG``.
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

__all__ = [
    "AcceptConnection",
    "BytesMessage",
    "CloseConnection",
    "CloseReason",
    "Connection",
    "ConnectionState",
    "ConnectionType",
    "Event",
    "H11Handshake",
    "Ping",
    "Pong",
    "RejectConnection",
    "RejectData",
    "RemoteProtocolError",
    "Request",
    "TextMessage",
    "NOT_SIMPLE",
    "binary_frame",
    "client_frame",
    "text_frame",
]

# ``client_frame``: the frame at the start of the buffer is one for wsproto to read.
NOT_SIMPLE = (0, b"", 0)


def text_frame(text: str) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455, server to client)."""
    return _frame(0x81, text.encode())


def binary_frame(data: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket binary frame (RFC 6455, server to client)."""
    return _frame(0x82, data)


def _frame(first: int, payload: bytes) -> bytes:
    """FIN and ``first``'s opcode, then the payload's length in 7, 16 or 64 bits."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 0x7E)) + size.to_bytes(2, "big") + payload
    return bytes((first, 0x7F)) + size.to_bytes(8, "big") + payload


def client_frame(buffer: bytes, limit: int) -> tuple[int, bytes, int] | None:
    """The frame at the start of ``buffer``, if it is a simple one: final, masked, no
    reserved bits, text (opcode 1) or binary (2), a payload of at most ``limit`` bytes
    (and under 64 KiB): ``(opcode, unmasked payload, bytes it took)``. None when the
    buffer does not hold all of such a frame yet; ``NOT_SIMPLE`` for any other frame
    (wsproto's to read, errors included)."""
    size = len(buffer)
    if size < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0xF0 != 0x80 or first & 0x0F not in (1, 2) or not second & 0x80:
        return NOT_SIMPLE
    length = second & 0x7F
    if length < 126:
        start = 6
    elif length == 126:
        if size < 4:
            return None
        length = int.from_bytes(buffer[2:4], "big")
        start = 8
    else:
        return NOT_SIMPLE
    if length > limit:
        return NOT_SIMPLE
    end = start + length
    if size < end:
        return None
    return first & 0x0F, _unmask(buffer[start:end], buffer[start - 4 : start]), end


def _unmask(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")
