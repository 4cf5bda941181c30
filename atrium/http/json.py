"""orjson for every JSON body (Quart's provider and our own responses)."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response
from quart.json.provider import DefaultJSONProvider

from ..core import json_input, json_output

_OPTIONS = json_output.OPTIONS | orjson.OPT_NON_STR_KEYS


def dumps_bytes(value: Any) -> bytes:
    """Serialise to JSON bytes (UUIDs, datetimes and dataclasses included)."""
    return orjson.dumps(value, option=_OPTIONS, default=json_output.default)


def error_body(code: str, message: str) -> bytes:
    """The one error shape, ``{"error": {"code", "message"}}``, as JSON bytes."""
    return dumps_bytes({"error": {"code": code, "message": message}})


def json_response(value: Any, status: int = 200) -> Response:
    return Response(dumps_bytes(value), status=status, content_type="application/json")


class OrjsonProvider(DefaultJSONProvider):
    """Quart's JSON provider backed by orjson; what it reads (request bodies) is bounded
    in depth (``json_input.loads``)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps_bytes(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return json_input.loads(s)
