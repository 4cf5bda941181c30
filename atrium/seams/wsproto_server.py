"""The wsproto side of the dedicated WebSocket listener, and the frames it writes itself.

Written against wsproto 1.3.2. Why: the listener (``atrium.http.ws_listener``) is a second
WebSocket server, over sockets it owns, for high fan-out: wsproto parses the opening
handshake and the frames that come in, but data frames going out are framed here
(:func:`text_frame`, :func:`binary_frame`) and written straight to the socket, with no
wsproto call per delivery. That is sound only while wsproto negotiates no extension (the
listener passes none to ``H11Handshake``/``Connection``, so a data frame is a header and
the payload) and only as long as these frames match what wsproto itself would send.

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
    "binary_frame",
    "text_frame",
]


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
