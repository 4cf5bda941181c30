"""The y-websocket wire format, free of I/O: read a client's binary message, build ours.

A y-websocket message is a varuint type, then its body: ``SYNC`` (0) carries a varuint sync
type (step 1: a state vector; step 2 and update: a Yjs update) and a length-prefixed
payload; ``AWARENESS`` (1) carries a length-prefixed awareness update, which is a varuint
count of entries, each a varuint client id, a varuint clock and a length-prefixed JSON
state (``null``: the client is gone). Other types (y-websocket's auth and awareness query)
are read as ``Ignored``.

Every reader here bounds what it reads and raises ``MalformedMessage`` (a ValueError) for
bytes that are not such a message: a client's bad bytes are a refusal, never a crash.
What a Yjs update itself contains is pycrdt's to decode (``Doc.apply_update`` raises
ValueError on garbage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pycrdt import Doc, YMessageType, YSyncMessageType, write_var_uint

# Yjs client ids are 32-bit and clocks fit in 53 bits (a JavaScript number): a varuint
# never needs more than 8 bytes for them; a longer one is garbage, not a big number.
_MAX_VARUINT_BYTES: Final = 8


class MalformedMessage(ValueError):
    """The bytes are not a y-websocket message (or not one this server reads)."""

    code = "malformed_message"


class YrsPanic(RuntimeError):
    """Yrs (pycrdt's Rust core) panicked while applying an update: the document it was
    applied to may hold part of it."""


def apply_update(doc: Doc[Any], update: bytes) -> None:
    """Apply a client's Yjs update to ``doc``. Raises MalformedMessage for bytes that are
    not an update (nothing applied), YrsPanic if Yrs panicked (pyo3 raises its panics as
    a BaseException, which must not unwind an actor as if it were a cancellation)."""
    try:
        doc.apply_update(update)
    except ValueError as error:
        raise MalformedMessage(str(error)) from None
    except BaseException as error:
        if type(error).__name__ != "PanicException":
            raise
        raise YrsPanic(str(error)) from None


@dataclass(frozen=True, slots=True)
class SyncStep1:
    """The sender's state vector: answer with what it lacks (sync step 2)."""

    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    """What the sender had that the receiver's state vector lacked (a Yjs update)."""

    update: bytes


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    """A Yjs update the sender just made."""

    update: bytes


@dataclass(frozen=True, slots=True)
class AwarenessUpdate:
    """An awareness update (parse its entries with ``parse_awareness``)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message type this server does not act on (y-websocket's auth, awareness query)."""

    kind: int


YMessage = SyncStep1 | SyncStep2 | SyncUpdate | AwarenessUpdate | Ignored


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    """One client's awareness: its ``state`` (a JSON object), or None when it left."""

    client_id: int
    clock: int
    state: dict[str, Any] | None


class _Reader:
    __slots__ = ("_data", "_at")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def var_uint(self) -> int:
        value = 0
        shift = 0
        for _ in range(_MAX_VARUINT_BYTES):
            if self._at >= len(self._data):
                raise MalformedMessage("message ends inside a number")
            byte = self._data[self._at]
            self._at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise MalformedMessage("number too long")

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        end = self._at + length
        if end > len(self._data):
            raise MalformedMessage("message ends inside a field")
        chunk = self._data[self._at : end]
        self._at = end
        return chunk

    def done(self) -> bool:
        return self._at >= len(self._data)


def parse_message(data: bytes) -> YMessage:
    """Read one y-websocket message. Raises MalformedMessage."""
    reader = _Reader(data)
    kind = reader.var_uint()
    if kind == YMessageType.SYNC:
        sync = reader.var_uint()
        payload = reader.var_bytes()
        if sync == YSyncMessageType.SYNC_STEP1:
            return SyncStep1(payload)
        if sync == YSyncMessageType.SYNC_STEP2:
            return SyncStep2(payload)
        if sync == YSyncMessageType.SYNC_UPDATE:
            return SyncUpdate(payload)
        raise MalformedMessage(f"unknown sync message type {sync}")
    if kind == YMessageType.AWARENESS:
        return AwarenessUpdate(reader.var_bytes())
    return Ignored(kind)


def _sync(kind: int, payload: bytes) -> bytes:
    return bytes((YMessageType.SYNC, kind)) + write_var_uint(len(payload)) + payload


def sync_step1(state_vector: bytes) -> bytes:
    """A sync step 1 message: ``state_vector`` (``Doc.get_state()``)."""
    return _sync(YSyncMessageType.SYNC_STEP1, state_vector)


def sync_step2(update: bytes) -> bytes:
    """A sync step 2 message: what the peer lacks (``Doc.get_update(its_state)``)."""
    return _sync(YSyncMessageType.SYNC_STEP2, update)


def sync_update(update: bytes) -> bytes:
    """An update message carrying one Yjs update."""
    return _sync(YSyncMessageType.SYNC_UPDATE, update)


def awareness_message(payload: bytes) -> bytes:
    """An awareness message carrying an encoded awareness update (``encode_awareness``)."""
    return bytes((YMessageType.AWARENESS,)) + write_var_uint(len(payload)) + payload


def parse_awareness(payload: bytes, *, max_entries: int = 64) -> list[AwarenessEntry]:
    """The entries of an awareness update. A state must be a JSON object or ``null``.
    Raises MalformedMessage (also for more than ``max_entries`` entries)."""
    reader = _Reader(payload)
    count = reader.var_uint()
    if count > max_entries:
        raise MalformedMessage(f"more than {max_entries} awareness entries")
    entries = []
    for _ in range(count):
        client_id = reader.var_uint()
        clock = reader.var_uint()
        raw = reader.var_bytes()
        try:
            state = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise MalformedMessage("awareness state is not JSON") from None
        if state is not None and not isinstance(state, dict):
            raise MalformedMessage("awareness state is not an object")
        entries.append(AwarenessEntry(client_id, clock, state))
    return entries


def encode_awareness(entries: Iterable[AwarenessEntry]) -> bytes:
    """An awareness update (the payload of an awareness message) holding ``entries``."""
    listed = list(entries)
    parts = [write_var_uint(len(listed))]
    for entry in listed:
        state = orjson.dumps(entry.state)  # None is "null": the client left
        parts += [
            write_var_uint(entry.client_id),
            write_var_uint(entry.clock),
            write_var_uint(len(state)),
            state,
        ]
    return b"".join(parts)


def stamped(state: Mapping[str, Any], user_id: str, name: str) -> dict[str, Any]:
    """``state`` with its ``user`` naming the authenticated user: ``user.id`` and
    ``user.name`` are the server's, whatever the client put there; other fields the client
    set on ``user`` (a colour, say) stay."""
    user = state.get("user")
    own = dict(user) if isinstance(user, Mapping) else {}
    own["id"] = user_id
    own["name"] = name
    return {**state, "user": own}


__all__ = [
    "AwarenessEntry",
    "AwarenessUpdate",
    "Ignored",
    "MalformedMessage",
    "SyncStep1",
    "SyncStep2",
    "SyncUpdate",
    "YMessage",
    "YrsPanic",
    "apply_update",
    "awareness_message",
    "encode_awareness",
    "parse_awareness",
    "parse_message",
    "stamped",
    "sync_step1",
    "sync_step2",
    "sync_update",
]
