"""The wire protocol on hostile input: it answers with an error code, it never raises."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from atrium.core import json_input
from atrium.core.events import Event, EventType
from atrium.core.timestamps import utc_iso, utc_now_iso
from atrium.realtime.protocol import (
    MAX_CHANGES_BYTES,
    MAX_CHANGES_DEPTH,
    MAX_CLIENT_ID_LENGTH,
    MAX_INT,
    MAX_PATH_LENGTH,
    Auth,
    CursorUpdate,
    FileChange,
    Ping,
    Pong,
    ProtocolError,
    encode,
    event_frame,
    non_negative_int,
    parse_client_frame,
)


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    "raw",
    [
        # The reproduction of issue 9: str() of the type recursed past the stack.
        '{"type":' + nested(1000) + "}",
        '{"type":' + "{" * 900 + "}" * 900 + "}",
        '{"type":"FILE_CHANGE","file_path":"/a","changes":' + nested(1000) + "}",
        '{"type":"FILE_CHANGE","file_path":"/a","changes":{"x":' + nested(500) + "}}",
        '{"type":"AUTH","token":' + nested(1000) + "}",
        '{"type":"CURSOR_UPDATE","position":' + nested(1000) + "}",
        nested(1000),
        nested(5000),  # past orjson's own limit of 1,024
        '{"a":' * 70 + "1" + "}" * 70,
    ],
)
def test_deep_nesting_is_malformed_json_not_an_exception(raw: str) -> None:
    result = parse_client_frame(raw)
    assert isinstance(result, ProtocolError)
    assert result.code == "malformed_json"
    assert orjson.loads(result.frame())["type"] == "ERROR"


def test_nesting_up_to_the_limit_is_read() -> None:
    depth = json_input.MAX_DEPTH - 1  # the frame object is the first level
    result = parse_client_frame('{"type":' + nested(depth) + "}")
    assert isinstance(result, ProtocolError) and result.code == "invalid_field"
    # Brackets inside strings count for nothing.
    result = parse_client_frame(
        orjson.dumps(
            {"type": "FILE_CHANGE", "file_path": "[" * 1000, "changes": {"text": "{" * 5000}}
        )
    )
    assert isinstance(result, FileChange)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe", "malformed_json"),
        ('"\ud800"', "malformed_json"),
        ("", "malformed_json"),
        ("1e400", "malformed_json"),
        ("[]", "invalid_frame"),
        ("null", "invalid_frame"),
        ('{"type": 12}', "invalid_field"),
        ('{"type": {"a": [1]}}', "invalid_field"),
        ('{"type": "NOPE\\u0000"}', "unknown_type"),
        ('{"type": "FILE_CHANGE", "file_path": "/a\\u0000", "changes": {}}', "invalid_field"),
        (
            '{"type": "FILE_CHANGE", "file_path": "/a", "changes": {"k": "\\u0000"}}',
            "invalid_field",
        ),
        (
            '{"type": "FILE_CHANGE", "file_path": "/a", "changes": {"lines_added": '
            + "9" * 40
            + "}}",
            "invalid_field",
        ),
        ('{"type": "FILE_CHANGE", "file_path": 7, "changes": {}}', "invalid_field"),
        ('{"type": "FILE_CHANGE", "file_path": "/a", "changes": [1]}', "invalid_field"),
        (
            '{"type": "CURSOR_UPDATE", "position": {"file": "a", "line": -1, "column": 0}}',
            "invalid_field",
        ),
        (
            '{"type": "CURSOR_UPDATE", "position": {"file": "a", "line": 1e30, "column": 0}}',
            "invalid_field",
        ),
        ('{"type": "AUTH", "token": "t", "since_seq": 18446744073709551616}', "invalid_field"),
        ('{"type": "AUTH", "token": ["t"]}', "missing_field"),
        (
            '{"type": "FILE_CHANGE", "id": {"x": 1}, "file_path": "/a", "changes": {}}',
            "invalid_field",
        ),
    ],
)
def test_hostile_values_get_stable_codes(raw: str | bytes, code: str) -> None:
    result = parse_client_frame(raw)
    assert isinstance(result, ProtocolError), result
    assert result.code == code, result


def test_json_input_bounds_depth_for_any_text() -> None:
    assert json_input.loads(nested(json_input.MAX_DEPTH)) == orjson.loads(
        nested(json_input.MAX_DEPTH)
    )
    with pytest.raises(json_input.TooDeep):
        json_input.loads(nested(json_input.MAX_DEPTH + 1))
    with pytest.raises(json_input.TooDeep):
        json_input.loads(b'{"a": ' + nested(json_input.MAX_DEPTH).encode() + b"}")
    # Wide but shallow is fine, and a scalar document is level 0.
    assert json_input.loads("[" + "[],{}," * 1000 + "1]")[-1] == 1
    assert json_input.loads('"[[[[["') == "[[[[["
    with pytest.raises(ValueError):
        json_input.loads("{")


# -- every validation branch, one frame type at a time ----------------------------------


def frame(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def refused(raw: str | bytes) -> ProtocolError:
    result = parse_client_frame(raw)
    assert isinstance(result, ProtocolError), result
    return result


def edit(**fields: Any) -> bytes:
    return frame(type="FILE_CHANGE", **fields)


def nested_changes(levels: int) -> dict[str, Any]:
    """``changes`` with ``levels`` levels of objects, itself included."""
    changes: dict[str, Any] = {}
    for _ in range(levels - 1):
        changes = {"k": changes}
    return changes


def test_a_valid_file_change_keeps_its_fields() -> None:
    changes = {"lines_added": 3, "lines_removed": 0, "change_type": "modify", "x": [1, None]}
    result = parse_client_frame(edit(id="c-1", file_path="/src/a.py", changes=changes))
    assert result == FileChange("/src/a.py", changes, "c-1")
    # The id is optional; an empty changes object is a change all the same.
    assert parse_client_frame(edit(file_path="/a", changes={})) == FileChange("/a", {}, None)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"changes": {}}, "missing_field"),
        ({"file_path": "/a"}, "missing_field"),
        ({"file_path": None, "changes": {}}, "missing_field"),
        ({"file_path": "", "changes": {}}, "invalid_field"),
        ({"file_path": "x" * (MAX_PATH_LENGTH + 1), "changes": {}}, "invalid_field"),
        ({"file_path": ["/a"], "changes": {}}, "invalid_field"),
        ({"file_path": "/a", "changes": None}, "invalid_field"),
        ({"file_path": "/a", "changes": "text"}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_added": -1}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_added": True}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_added": 1.0}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_added": "1"}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_removed": -5}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"lines_removed": MAX_INT + 1}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"change_type": 1}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"change_type": None}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"\x00key": 1}}, "invalid_field"),
        ({"file_path": "/a", "changes": {"list": ["ok", "\x00"]}}, "invalid_field"),
        ({"id": "", "file_path": "/a", "changes": {}}, "invalid_field"),
        (
            {"id": "i" * (MAX_CLIENT_ID_LENGTH + 1), "file_path": "/a", "changes": {}},
            "invalid_field",
        ),
        ({"id": 7, "file_path": "/a", "changes": {}}, "invalid_field"),
        ({"id": "a\x00", "file_path": "/a", "changes": {}}, "invalid_field"),
    ],
)
def test_file_change_fields_are_checked(fields: dict[str, Any], code: str) -> None:
    assert refused(edit(**fields)).code == code


def test_file_change_limits_are_inclusive() -> None:
    assert isinstance(
        parse_client_frame(edit(file_path="p" * MAX_PATH_LENGTH, changes={})), FileChange
    )
    longest_id = "i" * MAX_CLIENT_ID_LENGTH
    assert parse_client_frame(edit(id=longest_id, file_path="/a", changes={})) == FileChange(
        "/a", {}, longest_id
    )
    counts = {"lines_added": 0, "lines_removed": MAX_INT}
    assert isinstance(parse_client_frame(edit(file_path="/a", changes=counts)), FileChange)


def test_an_error_about_a_file_change_names_its_id() -> None:
    # The client matches the ERROR to the edit it sent (and stops resending it).
    error = refused(edit(id="e-9", file_path="/a", changes={"lines_added": -1}))
    assert error.id == "e-9"
    assert orjson.loads(error.frame()) == {
        "type": "ERROR",
        "code": "invalid_field",
        "message": "changes.lines_added must be an integer >= 0",
        "id": "e-9",
    }
    assert refused(edit(id="e-10", changes={})).id == "e-10"
    assert refused(edit(id="e-11", file_path="/a", changes={"k": "\x00"})).id == "e-11"
    # Without an id (or with one that is itself refused) the frame has none.
    assert "id" not in orjson.loads(refused(edit(file_path="/a", changes=[])).frame())
    assert refused(edit(id=["e"], file_path="/a", changes={})).id is None


def test_changes_nesting_is_bounded() -> None:
    deepest = nested_changes(MAX_CHANGES_DEPTH)
    assert isinstance(parse_client_frame(edit(file_path="/a", changes=deepest)), FileChange)
    error = refused(edit(file_path="/a", changes=nested_changes(MAX_CHANGES_DEPTH + 1)))
    assert error.code == "invalid_field"
    assert str(MAX_CHANGES_DEPTH) in error.message
    # Arrays count as levels too.
    as_lists: Any = []
    for _ in range(MAX_CHANGES_DEPTH - 2):
        as_lists = [as_lists]
    assert isinstance(parse_client_frame(edit(file_path="/a", changes={"k": as_lists})), FileChange)
    error = refused(edit(file_path="/a", changes={"k": [as_lists]}))
    assert error.code == "invalid_field"


def test_changes_size_is_bounded() -> None:
    overhead = len(orjson.dumps({"t": ""}))
    largest = {"t": "x" * (MAX_CHANGES_BYTES - overhead)}
    assert isinstance(parse_client_frame(edit(file_path="/a", changes=largest)), FileChange)
    error = refused(edit(file_path="/a", changes={"t": "x" * (MAX_CHANGES_BYTES - overhead + 1)}))
    assert error.code == "invalid_field"
    assert str(MAX_CHANGES_BYTES) in error.message


def cursor(position: Any) -> bytes:
    return frame(type="CURSOR_UPDATE", position=position)


def test_a_valid_cursor_update() -> None:
    assert parse_client_frame(cursor({"file": "/a", "line": 0, "column": MAX_INT})) == (
        CursorUpdate("/a", 0, MAX_INT)
    )
    assert isinstance(
        parse_client_frame(cursor({"file": "f" * MAX_PATH_LENGTH, "line": 1, "column": 2})),
        CursorUpdate,
    )


@pytest.mark.parametrize(
    ("position", "code"),
    [
        (None, "missing_field"),
        ([1, 2], "missing_field"),
        ("/a:1:2", "missing_field"),
        ({"line": 1, "column": 2}, "missing_field"),
        ({"file": "/a", "column": 2}, "missing_field"),
        ({"file": "/a", "line": 1}, "missing_field"),
        ({"file": "", "line": 1, "column": 2}, "invalid_field"),
        ({"file": 3, "line": 1, "column": 2}, "invalid_field"),
        ({"file": "x" * (MAX_PATH_LENGTH + 1), "line": 1, "column": 2}, "invalid_field"),
        ({"file": "/a", "line": "1", "column": 2}, "invalid_field"),
        ({"file": "/a", "line": 1, "column": -2}, "invalid_field"),
        ({"file": "/a", "line": 1, "column": 2.5}, "invalid_field"),
        ({"file": "/a", "line": 1, "column": False}, "invalid_field"),
        ({"file": "/a", "line": MAX_INT + 1, "column": 0}, "invalid_field"),
    ],
)
def test_cursor_fields_are_checked(position: Any, code: str) -> None:
    assert refused(cursor(position)).code == code


def test_cursor_update_without_position() -> None:
    assert refused(frame(type="CURSOR_UPDATE")).code == "missing_field"


def test_auth_frames() -> None:
    assert parse_client_frame(frame(type="AUTH", token="t")) == Auth("t", None)
    assert parse_client_frame(frame(type="AUTH", token="t", since_seq=0)) == Auth("t", 0)
    assert parse_client_frame(frame(type="AUTH", token="t", since_seq=MAX_INT)) == Auth(
        "t", MAX_INT
    )
    assert parse_client_frame(frame(type="AUTH", token="t", since_seq=None)) == Auth("t", None)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "missing_field"),
        ({"token": ""}, "missing_field"),
        ({"token": None}, "missing_field"),
        ({"token": 12}, "missing_field"),
        ({"token": "t", "since_seq": -1}, "invalid_field"),
        ({"token": "t", "since_seq": "5"}, "invalid_field"),
        ({"token": "t", "since_seq": 5.0}, "invalid_field"),
        ({"token": "t", "since_seq": True}, "invalid_field"),
        ({"token": "t", "since_seq": MAX_INT + 1}, "invalid_field"),
    ],
)
def test_auth_fields_are_checked(fields: dict[str, Any], code: str) -> None:
    assert refused(frame(type="AUTH", **fields)).code == code


def test_ping_pong_and_types() -> None:
    assert parse_client_frame('{"type": "PING"}') == Ping()
    assert parse_client_frame('{"type": "PONG", "extra": [1]}') == Pong()
    # Types are case-sensitive, as docs/WEBSOCKET.md writes them.
    assert refused('{"type": "ping"}').code == "unknown_type"
    assert refused('{"position": {}}').code == "missing_field"
    assert refused('{"type": null}').code == "missing_field"
    error = refused(frame(type="X" * 500))
    assert error.code == "unknown_type"
    assert len(error.message) < 80  # the type is quoted, cut short


def test_bytes_frames_are_read_like_text() -> None:
    assert parse_client_frame(b'{"type": "PING"}') == Ping()
    assert parse_client_frame(frame(type="AUTH", token="t", since_seq=4)) == Auth("t", 4)
    assert refused(b"{not json").code == "malformed_json"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0),
        ("42", 42),
        (str(MAX_INT), MAX_INT),
        (str(MAX_INT + 1), None),
        ("-1", None),
        ("", None),
        ("4.5", None),
        ("abc", None),
    ],
)
def test_non_negative_int_reads_query_parameters(raw: str, expected: int | None) -> None:
    assert non_negative_int(raw) == expected


def test_encode_writes_utc_timestamps_and_ids() -> None:
    project = uuid.UUID("12345678-1234-5678-1234-567812345678")
    text = encode(
        {
            "type": "X",
            "at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
            "naive": datetime(2030, 1, 2, 3, 4, 5),
            "project_id": project,
        }
    )
    assert isinstance(text, str)
    assert orjson.loads(text) == {
        "type": "X",
        "at": "2030-01-02T03:04:05Z",
        "naive": "2030-01-02T03:04:05Z",
        "project_id": str(project),
    }
    stamp = utc_now_iso()
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp).tzinfo is not None
    # One format: what a frame writes for a datetime is what atrium.core.timestamps writes.
    for moment in (datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), datetime.fromisoformat(stamp)):
        assert orjson.loads(encode({"at": moment}))["at"] == utc_iso(moment)


def test_event_frame_flattens_the_payload_under_the_envelope() -> None:
    project, actor = uuid.uuid4(), uuid.uuid4()
    at = datetime(2030, 1, 2, tzinfo=UTC)
    # A payload cannot overwrite the envelope (a client chose these keys).
    payload = {"file_path": "/a", "seq": 999, "type": "FORGED"}
    event = Event(project, 7, EventType.FILE_CHANGE, actor, payload, at)
    assert event_frame(event) == {
        "type": "FILE_CHANGE",
        "seq": 7,
        "project_id": str(project),
        "user_id": str(actor),
        "timestamp": at,
        "file_path": "/a",
    }
    system = Event(project, 8, EventType.JOB_DEAD, None, {}, at)
    result = event_frame(system)
    assert result["user_id"] is None
    assert "file_path" not in result
