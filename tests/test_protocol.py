"""The wire protocol on hostile input: it answers with an error code, it never raises."""

from __future__ import annotations

import orjson
import pytest

from atrium import json_input
from atrium.protocol import FileChange, ProtocolError, parse_client_frame


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
