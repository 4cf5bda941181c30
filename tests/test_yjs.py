"""The y-websocket wire helpers (atrium/realtime/yjs.py), against pycrdt's own encoders."""

from __future__ import annotations

from typing import Any

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atrium.realtime import yjs


def test_messages_read_what_pycrdt_writes_and_the_other_way_round() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.get("content", type=pycrdt.Text).insert(0, "hi")
    state, update = doc.get_state(), doc.get_update()
    assert yjs.parse_message(pycrdt.create_sync_message(doc)) == yjs.SyncStep1(state)
    assert yjs.parse_message(pycrdt.create_update_message(update)) == yjs.SyncUpdate(update)
    assert yjs.sync_step1(state) == pycrdt.create_sync_message(doc)
    assert yjs.sync_update(update) == pycrdt.create_update_message(update)
    # pycrdt answers our step 1 with a step 2 we read back.
    fresh: pycrdt.Doc[Any] = pycrdt.Doc()
    reply = pycrdt.handle_sync_message(yjs.sync_step1(fresh.get_state())[1:], doc)
    assert reply is not None
    step2 = yjs.parse_message(reply)
    assert isinstance(step2, yjs.SyncStep2)
    yjs.apply_update(fresh, step2.update)
    assert str(fresh.get("content", type=pycrdt.Text)) == "hi"
    assert yjs.parse_message(yjs.sync_step2(b"ab")) == yjs.SyncStep2(b"ab")
    assert yjs.parse_message(b"\x02\x00") == yjs.Ignored(2)


def test_awareness_round_trips_through_pycrdt() -> None:
    entries = [
        yjs.AwarenessEntry(7, 3, {"user": {"name": "a"}, "cursor": None}),
        yjs.AwarenessEntry(2**32 - 1, 2**53 - 1, None),
    ]
    payload = yjs.encode_awareness(entries)
    assert yjs.parse_awareness(payload) == entries
    theirs = pycrdt.Awareness(pycrdt.Doc())
    theirs.apply_awareness_update(payload, "remote")
    assert theirs.states[7] == {"user": {"name": "a"}, "cursor": None}
    assert yjs.parse_awareness(theirs.encode_awareness_update([7]))[0].state == entries[0].state
    message = yjs.parse_message(yjs.awareness_message(payload))
    assert message == yjs.AwarenessUpdate(payload)


def test_stamped_overrides_who_and_keeps_the_rest() -> None:
    assert yjs.stamped({"user": {"name": "x", "color": "#0f0"}, "k": 1}, "u", "e@x") == {
        "user": {"name": "e@x", "id": "u", "color": "#0f0"},
        "k": 1,
    }
    assert yjs.stamped({"user": "not an object"}, "u", "e")["user"] == {"id": "u", "name": "e"}


def test_awareness_limits() -> None:
    many = yjs.encode_awareness(yjs.AwarenessEntry(i, 1, {}) for i in range(65))
    with pytest.raises(yjs.MalformedMessage):
        yjs.parse_awareness(many)
    with pytest.raises(yjs.MalformedMessage):
        yjs.parse_awareness(b"\x01\x01\x01\x03\xff\xfe\xfd")  # not UTF-8 JSON


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    """Arbitrary bytes never raise anything but MalformedMessage (a ValueError)."""
    try:
        message = yjs.parse_message(data)
        if isinstance(message, yjs.AwarenessUpdate):
            yjs.parse_awareness(message.payload)
        if isinstance(message, yjs.SyncUpdate | yjs.SyncStep2):
            yjs.apply_update(pycrdt.Doc(), message.update)
    except yjs.MalformedMessage:
        pass
