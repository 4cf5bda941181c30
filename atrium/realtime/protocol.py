"""The workspace wire protocol: frames, validation and close codes, free of I/O.

Client frames are JSON objects with a ``type``. Parsing never raises on bad input: it
returns a ``ProtocolError`` with a stable code, which the session sends back as an
``ERROR`` frame while the connection stays open.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from ..core import json_input, json_output
from ..core.events import Event

MAX_PATH_LENGTH = 1024
MAX_CLIENT_ID_LENGTH = 64
# Integers from clients fit PostgreSQL's bigint (and orjson, which writes 64 bits at most).
MAX_INT = 2**63 - 1
MAX_CHANGES_DEPTH = 32  # levels of objects and arrays in a FILE_CHANGE's changes
MAX_CHANGES_BYTES = 16_384


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses; docs/WEBSOCKET.md documents when to retry."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect and resume
    INVALID_PAYLOAD = 1007  # a live document's client sent bytes that are not y-websocket
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the workspace restarted: reconnect and resume
    TRY_AGAIN_LATER = 1013  # the database is unavailable: reconnect after a backoff, resume
    BAD_REQUEST = 4000  # bad URL or query parameters: do not retry as is
    UNAUTHORIZED = 4001  # missing or invalid token, or the session ended: retry with a new token
    AUTH_TIMEOUT = 4002  # no AUTH frame in time
    FORBIDDEN = 4003  # origin not allowed, or the path's user id is not the token's
    PROJECT_NOT_FOUND = 4004  # no such project, or not a member: do not retry
    MEMBER_REMOVED = 4005  # removed from the project while connected
    PROJECT_DELETED = 4006
    TOKEN_EXPIRED = 4007  # did not re-authenticate after TOKEN_EXPIRING
    SLOW_CONSUMER = 4008  # could not keep up: reconnect and resume
    HEARTBEAT_TIMEOUT = 4009  # did not answer pings
    RATE_LIMITED = 4010  # kept sending over the message rate limit
    TOO_MANY_CONNECTIONS = 4011  # the user holds WS_MAX_CONNECTIONS_PER_USER already
    DOCUMENT_TOO_LARGE = 4012  # the update would take a live document past DOC_MAX_BYTES
    DOCUMENT_DELETED = 4013  # the live document was deleted while connected
    ROLE_CHANGED = 4014  # a live document's member got another role: reconnect for it


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A refused client frame: becomes an ``ERROR`` frame, the connection stays open."""

    code: str
    message: str
    id: str | None = None

    def frame(self) -> str:
        body: dict[str, Any] = {"type": "ERROR", "code": self.code, "message": self.message}
        if self.id is not None:
            body["id"] = self.id
        return encode(body)


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    since_seq: int | None


@dataclass(frozen=True, slots=True)
class FileChange:
    file_path: str
    changes: dict[str, Any]
    client_id: str | None


@dataclass(frozen=True, slots=True)
class CursorUpdate:
    file: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


ClientMessage = Auth | FileChange | CursorUpdate | Ping | Pong


def _non_negative_int(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def non_negative_int(raw: str) -> int | None:
    """``raw`` (a query parameter) as an integer in 0..MAX_INT, else None."""
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if _non_negative_int(value) else None


def _client_id(data: dict[str, Any]) -> str | None | ProtocolError:
    client_id = data.get("id")
    if client_id is None:
        return None
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID_LENGTH:
        return ProtocolError("invalid_field", f"id must be a string of 1-{MAX_CLIENT_ID_LENGTH}")
    return client_id


def _file_change(data: dict[str, Any]) -> FileChange | ProtocolError:
    client_id = _client_id(data)
    if isinstance(client_id, ProtocolError):
        return client_id
    path = data.get("file_path")
    if path is None or "changes" not in data:
        return ProtocolError("missing_field", "FILE_CHANGE needs file_path and changes", client_id)
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_LENGTH:
        return ProtocolError("invalid_field", "file_path must be a non-empty string", client_id)
    changes = data["changes"]
    if not isinstance(changes, dict):
        return ProtocolError("invalid_field", "changes must be an object", client_id)
    for key in ("lines_added", "lines_removed"):
        if key in changes and not _non_negative_int(changes[key]):
            return ProtocolError(
                "invalid_field", f"changes.{key} must be an integer >= 0", client_id
            )
    if "change_type" in changes and not isinstance(changes["change_type"], str):
        return ProtocolError("invalid_field", "changes.change_type must be a string", client_id)
    problem = _unstorable([path, client_id, changes])
    if problem is not None:
        return ProtocolError("invalid_field", problem, client_id)
    if len(orjson.dumps(changes)) > MAX_CHANGES_BYTES:
        return ProtocolError(
            "invalid_field", f"changes must be under {MAX_CHANGES_BYTES} bytes", client_id
        )
    return FileChange(path, changes, client_id)


def _unstorable(value: Any) -> str | None:
    """Why ``value`` cannot go into the event log and back out to clients, or None.

    PostgreSQL text and jsonb cannot hold NUL, and orjson writes at most 254 levels of
    nesting (it reads 1,024): either would fail the insert or the broadcast, and the
    workspace with it, so both are refused here. Not recursive, for the same reason.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "FILE_CHANGE must not contain NUL characters"
        elif isinstance(item, dict | list):
            if depth > MAX_CHANGES_DEPTH:
                return f"changes must not nest deeper than {MAX_CHANGES_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
    return None


def _cursor(data: dict[str, Any]) -> CursorUpdate | ProtocolError:
    position = data.get("position")
    if not isinstance(position, dict):
        return ProtocolError("missing_field", "CURSOR_UPDATE needs position {file, line, column}")
    file, line, column = position.get("file"), position.get("line"), position.get("column")
    if file is None or line is None or column is None:
        return ProtocolError("missing_field", "position needs file, line and column")
    if not isinstance(file, str) or not 0 < len(file) <= MAX_PATH_LENGTH:
        return ProtocolError("invalid_field", "position.file must be a non-empty string")
    if not (_non_negative_int(line) and _non_negative_int(column)):
        return ProtocolError("invalid_field", "position.line and column must be integers >= 0")
    return CursorUpdate(file, line, column)


def _auth(data: dict[str, Any]) -> Auth | ProtocolError:
    token = data.get("token")
    if not isinstance(token, str) or not token:
        return ProtocolError("missing_field", "AUTH needs a token")
    since = data.get("since_seq")
    if since is not None and not _non_negative_int(since):
        return ProtocolError("invalid_field", "since_seq must be an integer >= 0")
    return Auth(token, since)


def parse_client_frame(raw: str | bytes) -> ClientMessage | ProtocolError:
    """Parse one client frame; bad JSON (nesting past ``json_input.MAX_DEPTH`` included),
    unknown types and bad fields give ProtocolError. Never raises, whatever ``raw`` is."""
    try:
        data = json_input.loads(raw)
    except json_input.TooDeep as error:
        return ProtocolError("malformed_json", str(error))
    except orjson.JSONDecodeError:
        return ProtocolError("malformed_json", "The frame is not valid JSON")
    if not isinstance(data, dict):
        return ProtocolError("invalid_frame", "A frame must be a JSON object")
    kind = data.get("type")
    if kind == "FILE_CHANGE":
        return _file_change(data)
    if kind == "CURSOR_UPDATE":
        return _cursor(data)
    if kind == "PING":
        return Ping()
    if kind == "PONG":
        return Pong()
    if kind == "AUTH":
        return _auth(data)
    if kind is None:
        return ProtocolError("missing_field", "A frame needs a type")
    if not isinstance(kind, str):
        # Never str() a value from the frame: of a deeply nested list it recurses.
        return ProtocolError("invalid_field", "type must be a string")
    return ProtocolError("unknown_type", f"Unknown frame type {kind[:40]!r}")


def encode(frame: dict[str, Any]) -> str:
    """Serialise a server frame once, as the text every connection is sent."""
    return json_output.dumps(frame).decode()


def event_frame(event: Event) -> dict[str, Any]:
    """The frame for a durable event of the project log (what clients see for it): the
    event's fields, then its payload's (which never override them)."""
    frame: dict[str, Any] = {
        "type": event.type,
        "seq": event.seq,
        "project_id": str(event.project_id),
        "user_id": None if event.actor_id is None else str(event.actor_id),
        "timestamp": event.created_at,
    }
    for key, value in event.payload.items():
        frame.setdefault(key, value)
    return frame
