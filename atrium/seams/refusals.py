"""The responses the HTTP/1.1 protocols write themselves, in atrium's error shape.

A request refused before any app sees it (malformed, a head too large, a transfer coding
it cannot read) is answered by the protocol, not by Quart: hypercorn writes those with an
empty body. A client sending garbage, or a schema fuzzer, must still see the one error
shape every other refusal has, ``{"error": {"code", "message"}}`` as
``application/json`` with a stable code (docs/API.md, "Error codes"), and a close.

Seams import no other part of atrium, so the codes are named here, in the app's style
(``atrium/http/errors.py``); each body is encoded once, at import.
"""

from __future__ import annotations

import orjson

# The statuses a protocol answers itself: llhttp's and h11's refusals, a Host outside
# ``server_names`` (404), an app that ended without a response (500).
_REFUSALS = {
    400: ("bad_request", "The request is not valid HTTP/1.1"),
    404: ("not_found", "This server does not serve that host"),
    431: ("headers_too_large", "The request head is larger than this server accepts"),
    500: ("internal_error", "Something went wrong on our side"),
    501: ("not_implemented", "Transfer-Encoding other than chunked is not supported"),
}


def _encoded(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


_BODIES = {status: _encoded(code, message) for status, (code, message) in _REFUSALS.items()}
# Any other status (h11 may hint another in a later release): the app's catch-all code.
_OTHER_BODY = _encoded("http_error", "The request was refused")


def refusal_body(status: int) -> bytes:
    """The JSON error body for ``status``."""
    return _BODIES.get(status, _OTHER_BODY)


def refusal_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a refusal carrying ``body``: its length, its type, and a close."""
    return [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]


def refusal(status: int, server_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The whole response a protocol writes for ``status`` (head and JSON body), after
    which it closes the connection."""
    body = refusal_body(status)
    lines = [b"HTTP/1.1 %d \r\n" % status]
    lines += [b"%s: %s\r\n" % pair for pair in refusal_headers(body)]
    lines += [b"%s: %s\r\n" % pair for pair in server_headers]
    return b"".join(lines) + b"\r\n" + body
