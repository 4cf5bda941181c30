"""What the seam's HTTP/1.1 server answers to hostile and unusual requests, over a socket.

The seam parses requests with h11 today. These are its answers, as a client sees them
(status, body, whether the connection stays open): the contract that a faster parser in
the seam (httptools, docs/BENCHMARKS.md "The HTTP floor, third pass") must keep, or
tighten where noted. Where llhttp answers differently from h11, the case says so.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from atrium.seams import hypercorn_server
from tests.test_seams import CAP, PARSERS, _serve_seam

_GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


async def _echo(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Answers 200 with the request's body, read to its end."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _answers(
    request: bytes,
    parser: hypercorn_server.Parser,
    *,
    then: bytes = _GET,
    config: Config | None = None,
) -> tuple[bytes, bytes | None]:
    """What the seam writes back to ``request``, read until it pauses or closes; then the
    answer to ``then`` on the same connection (None if the connection was closed)."""
    if config is None:
        config = Config()
        config.h11_max_incomplete_size = 4096
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _echo, config, print, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                first = await _read_responses(stream)
                second: bytes | None = None
                try:
                    await stream.send_all(then)
                    second = await _read_responses(stream) or None
                except trio.BrokenResourceError:
                    pass
            nursery.cancel_scope.cancel()
    return first, second


async def _read_responses(stream: trio.SocketStream) -> bytes:
    """Bytes until the server closes, or until every response begun is complete."""
    received = b""
    while not _complete(received):
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


def _complete(data: bytes) -> bool:
    """``data`` is one or more whole responses with a Content-Length (100s aside)."""
    if not data:
        return False
    while data:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            return False
        if head.startswith(b"HTTP/1.1 100 "):
            data = rest
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return False
        data = rest[length:]
    return True


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def _headers(response: bytes) -> dict[bytes, bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    pairs = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


# The codes of the refusals the protocols write themselves (atrium/seams/refusals.py).
_REFUSAL_CODES = {
    400: "bad_request",
    404: "not_found",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def _assert_refusal(response: bytes, status: int) -> None:
    """``response`` is ``status`` in atrium's error shape, its length right, and says it
    closes the connection."""
    assert _status(response) == status, response
    headers, body = _headers(response), _body(response)
    assert headers[b"content-type"] == b"application/json", response
    assert int(headers[b"content-length"]) == len(body), response
    assert headers[b"connection"] == b"close", response
    error = orjson.loads(body)["error"]
    assert error["code"] == _REFUSAL_CODES[status], response
    assert error["message"], response


# (request, status, body of a 200, the connection stays open for a next request)
_CASES = {
    "plain GET": (_GET, 200, b"", True),
    "Content-Length body": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello",
        200,
        b"hello",
        True,
    ),
    "chunked body, with a chunk extension": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        200,
        b"hello",
        True,
    ),
    # h11: Transfer-Encoding wins and Content-Length is ignored (RFC 9112 6.3); llhttp
    # refuses the request (stricter: a swap may answer 400 and close).
    "Content-Length and Transfer-Encoding both": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 40\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        200,
        b"hi",
        True,
    ),
    # h11 merges equal lengths (RFC 9110 8.6); llhttp refuses any duplicate.
    "two equal Content-Lengths": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        200,
        b"hi",
        True,
    ),
    "two different Content-Lengths": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!",
        400,
        b"",
        False,
    ),
    "a signed Content-Length": (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: +2\r\n\r\nhi",
        400,
        b"",
        False,
    ),
    # h11 answers 501 to a coding it does not know; llhttp refuses it as malformed.
    "Transfer-Encoding other than chunked": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        b"",
        False,
    ),
    "a bad chunk size": (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n",
        400,
        b"",
        False,
    ),
    # h11 unfolds an obs-fold line into the header before it; llhttp refuses it.
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: test\r\nX-A: b\r\n c\r\n\r\n", 200, b"", True),
    # h11 takes a bare LF as a line end; llhttp refuses it.
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: test\n\n", 200, b"", True),
    "whitespace before a header's colon": (
        b"GET / HTTP/1.1\r\nHost: test\r\nX-A : b\r\n\r\n",
        400,
        b"",
        False,
    ),
    "NUL in a header value": (
        b"GET / HTTP/1.1\r\nHost: test\r\nX: a\x00b\r\n\r\n",
        400,
        b"",
        False,
    ),
    # h11 refuses HTTP/1.1 without Host; llhttp accepts it (a swap must check Host itself).
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", 400, b"", False),
    "a request line that is not HTTP": (b"HELLO\r\n\r\n", 400, b"", False),
    "a space in the request target": (b"GET /a b HTTP/1.1\r\nHost: test\r\n\r\n", 400, b"", False),
    "a control byte in a header name": (
        b"GET / HTTP/1.1\r\nHost: test\r\nX\x01Y: b\r\n\r\n",
        400,
        b"",
        False,
    ),
    "a byte over 0x7f in a header name": (
        b"GET / HTTP/1.1\r\nHost: test\r\nX\xffY: b\r\n\r\n",
        400,
        b"",
        False,
    ),
    "binary garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, b"", False),
    # A head still incomplete past h11_max_incomplete_size (4 KiB here).
    "a head over h11_max_incomplete_size": (
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 8192,
        431,
        b"",
        False,
    ),
    # h11 takes any token as a method (hypercorn upper-cases it); llhttp only the methods
    # it knows, in capitals.
    "a method llhttp does not know": (b"FOO / HTTP/1.1\r\nHost: test\r\n\r\n", 200, b"", True),
    "a method in lower case": (b"get / HTTP/1.1\r\nHost: test\r\n\r\n", 200, b"", True),
    # Upgrade without the upgrade connection option is not an upgrade (RFC 9110 7.8): a
    # plain request on both (hypercorn alone would switch to h2c; the seam's H11Protocol
    # does not).
    "Upgrade: h2c without Connection: upgrade": (
        b"GET / HTTP/1.1\r\nHost: test\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        200,
        b"",
        True,
    ),
    # HTTP/1.0 without keep-alive: answered, then closed.
    "HTTP/1.0": (b"GET / HTTP/1.0\r\n\r\n", 200, b"", False),
}


# Where llhttp is stricter than h11 (docs/BENCHMARKS.md, "The HTTP floor, third pass";
# the methods found here): on httptools these are refused, 400 and a close.
_LLHTTP_REFUSES = {
    "a method llhttp does not know",
    "a method in lower case",
    "Content-Length and Transfer-Encoding both",
    "two equal Content-Lengths",
    "obs-fold",
    "bare LF line ends",
}


@PARSERS
@pytest.mark.parametrize("case", list(_CASES))
async def test_seam_http1_answers_as_h11_does(case: str, parser: hypercorn_server.Parser) -> None:
    request, status, body, stays_open = _CASES[case]
    if parser == "httptools" and case in _LLHTTP_REFUSES:
        status, body, stays_open = 400, b"", False
    first, second = await _answers(request, parser)
    assert first.startswith(b"HTTP/1."), f"{case}: answered {first[:80]!r}"
    assert _status(first) == status, f"{case}: answered {first[:80]!r}"
    if status == 200:
        assert _body(first) == body, f"{case}: answered {first!r}"
    else:
        _assert_refusal(first, status)
    if stays_open:
        assert second is not None and _status(second) == 200, f"{case}: then {second!r}"
    else:
        assert second is None, f"{case}: the connection stayed open: {second!r}"


@PARSERS
async def test_seam_http1_answers_pipelined_requests_in_order(
    parser: hypercorn_server.Parser,
) -> None:
    """Three requests in one write: three answers, in order, on the kept connection."""
    posts = b"".join(
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\n%d" % n for n in range(3)
    )
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _echo, Config(), print, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(posts + _GET)
                received = b""
                while received.count(b"HTTP/1.1 200 ") < 4 or not _complete(received):
                    chunk = await stream.receive_some()
                    assert chunk, f"closed after {received!r}"
                    received += chunk
            nursery.cancel_scope.cancel()
    responses = [b"HTTP/1.1 " + r for r in received.split(b"HTTP/1.1 ")[1:]]
    assert [_body(r) for r in responses] == [b"0", b"1", b"2", b""], received


@PARSERS
async def test_seam_http1_answers_expect_100_continue_before_the_body(
    parser: hypercorn_server.Parser,
) -> None:
    """``Expect: 100-continue``: the 100 comes before the client sends the body."""
    config = Config()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _echo, config, print, parser)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                interim = await stream.receive_some()
                assert interim.startswith(b"HTTP/1.1 100 "), interim
                await stream.send_all(b"hi")
                final = await _read_responses(stream)
            nursery.cancel_scope.cancel()
    assert _status(final) == 200 and _body(final) == b"hi", final


_SCOPED = [
    b"GET /a%20b/c?x=1&y=%2F HTTP/1.1\r\nHost: test:80\r\nX-Mixed-Case: V\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nContent-Type: a/b\r\n\r\nabc",
    b"HEAD / HTTP/1.1\r\nHost: test\r\nAccept: */*\r\nAccept: text/html\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
]


async def _scopes(parser: hypercorn_server.Parser, raw_headers: bool) -> list[dict[str, Any]]:
    """The scopes the seam hands its app for ``_SCOPED``, each on its own connection, with
    the ports (which differ from run to run) taken out."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            scopes.append(dict(scope))
        await _echo(scope, receive, send)

    config = Config()
    config.h11_pass_raw_headers = raw_headers
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, app, config, print, parser)
            for request in _SCOPED:
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(request)
                    await _read_responses(stream)
            nursery.cancel_scope.cancel()
    for scope in scopes:
        scope["client"] = scope["client"][0]
        scope["server"] = scope["server"][0]
    return scopes


@pytest.mark.parametrize("raw_headers", [False, True])
async def test_seam_llhttp_builds_the_scope_hypercorn_builds(raw_headers: bool) -> None:
    """The app sees the same ASGI scope (path, query, headers, version, state, ...) from
    the seam's llhttp protocol as from hypercorn's ``HTTPStream``."""
    ours = await _scopes("httptools", raw_headers)
    theirs = await _scopes("h11", raw_headers)
    assert len(ours) == len(_SCOPED)
    assert ours == theirs


async def _responder(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Answers as its path says: ``/len`` with a Content-Length, ``/chunked`` in two body
    messages without one, ``/204``, ``/close`` asking to close, ``/crash-before`` and
    ``/crash-after`` raising before and in the middle of the response, ``/too-much`` and
    ``/too-little`` writing another length than the one declared."""
    if scope["type"] == "lifespan":
        await _echo(scope, receive, send)
        return
    path = scope["path"]
    if path == "/crash-before":
        raise RuntimeError("the app failed")
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"text/plain")]
    status = 204 if path == "/204" else 200
    body, more = b"hello", b""
    if path == "/chunked" or path == "/crash-after":
        more = b" world"
    elif path == "/close":
        headers.append((b"connection", b"close"))
    elif path == "/too-much":
        headers.append((b"content-length", b"2"))
    elif path == "/too-little":
        headers.append((b"content-length", b"9"))
    if path in ("/len", "/close", "/end"):
        headers.append((b"content-length", b"%d" % len(body)))
    if status == 204:
        body = b""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": bool(more)})
    if path == "/crash-after":
        raise RuntimeError("the app failed halfway")
    if more:
        await send({"type": "http.response.body", "body": more, "more_body": False})


_END = b"GET /end HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


async def _written(parser: hypercorn_server.Parser, request: bytes, then: bytes = _END) -> bytes:
    """Every byte the seam writes for ``request`` then ``then``, until it closes."""
    config = Config()
    config.include_date_header = False
    config.include_server_header = False
    received = b""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _responder, config, lambda _: None, parser)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(request + then)
                while chunk := await stream.receive_some():
                    received += chunk
            nursery.cancel_scope.cancel()
    return received


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /len HTTP/1.1",
        b"GET /chunked HTTP/1.1",
        b"HEAD /len HTTP/1.1",
        b"HEAD /chunked HTTP/1.1",
        b"GET /204 HTTP/1.1",
        b"GET /close HTTP/1.1",
        b"GET /crash-after HTTP/1.1",
        b"GET /too-much HTTP/1.1",
        b"GET /too-little HTTP/1.1",
        b"GET /chunked HTTP/1.0",
        b"GET /len HTTP/1.0\r\nConnection: keep-alive",
        b"GET /len HTTP/1.1\r\nConnection: close",
    ],
)
async def test_seam_llhttp_writes_what_h11_writes(request_line: bytes) -> None:
    """Byte for byte, the seam's llhttp protocol writes the responses hypercorn's h11 does:
    framing (length, chunked, close-delimited for HTTP/1.0), no body for HEAD and 204,
    a close for an app that fails in its response or writes another length than it
    declared, and Connection: close where h11 closes. (An app that fails before its
    response: see the test after.)"""
    request = request_line + b"\r\nHost: test\r\n\r\n"
    # Nothing after a request that closes the connection: see the test below.
    then = b"" if b"HTTP/1.0" in request or b"close" in request else _END
    theirs = await _written("h11", request, then)
    ours = await _written("httptools", request, then)
    assert ours == theirs


async def test_seam_llhttp_answers_what_it_writes_itself_in_the_error_shape() -> None:
    """The responses the llhttp protocol writes in place of an app's are JSON errors with a
    close: 500 ``internal_error`` for an app that failed before its response, and 404
    ``not_found`` for a Host outside ``server_names``. (hypercorn's ``HTTPStream`` writes
    both with an empty body on ``HTTP_PARSER=h11``: it is not the seam's to change.)"""
    crashed = await _written("httptools", b"GET /crash-before HTTP/1.1\r\nHost: test\r\n\r\n")
    _assert_refusal(crashed, 500)
    assert crashed.count(b"HTTP/1.1 ") == 1, crashed
    config = Config()
    config.server_names = ["atrium.example"]
    first, second = await _answers(_GET, "httptools", config=config)
    _assert_refusal(first, 404)
    assert second is None, second


@PARSERS
async def test_seam_http1_a_request_pipelined_after_connection_close(
    parser: hypercorn_server.Parser,
) -> None:
    """A request sent after one asking to close: h11 finds it before the first is answered
    and answers 400 in place of the first's response; llhttp answers the first, then
    closes. Either way the second is not served."""
    first = b"GET /len HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    written = await _written(parser, first)
    status = 400 if parser == "h11" else 200
    assert _status(written) == status and written.count(b"HTTP/1.1 ") == 1, written


@PARSERS
async def test_seam_http1_tells_the_app_of_a_client_gone_mid_body(
    parser: hypercorn_server.Parser,
) -> None:
    """A client that closes before its body is all sent: the app waiting for the body is
    told ``http.disconnect`` (and so ends), rather than waiting for ever."""
    told: list[str] = []
    ended = trio.Event()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await _echo(scope, receive, send)
            return
        try:
            while (message := await receive())["type"] == "http.request":
                told.append(f"{message['type']} {message.get('body', b'')!r}")
            told.append(message["type"])
        finally:
            ended.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, app, Config(), print, parser)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(
                    b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nhalf"
                )
                while not told:
                    await trio.testing.wait_all_tasks_blocked()
            await ended.wait()
            nursery.cancel_scope.cancel()
    assert told == ["http.request b'half'", "http.disconnect"]


@PARSERS
async def test_seam_http1_refuses_a_head_grown_past_the_limit_in_pieces(
    parser: hypercorn_server.Parser,
) -> None:
    """A head sent a piece at a time, never ending: 431 once it outgrows
    ``h11_max_incomplete_size``, and the connection is closed."""
    config = Config()
    config.h11_max_incomplete_size = 4096
    answer = b""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _echo, config, print, parser)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: test\r\n")
                try:
                    for n in range(100):
                        await stream.send_all(b"X-%d: %s\r\n" % (n, b"a" * 1000))
                        await trio.testing.wait_all_tasks_blocked()
                except trio.BrokenResourceError:
                    pass
                while chunk := await stream.receive_some():
                    answer += chunk
            nursery.cancel_scope.cancel()
    _assert_refusal(answer, 431)


@PARSERS
async def test_seam_http1_hands_http2_with_prior_knowledge_to_hypercorn(
    parser: hypercorn_server.Parser,
) -> None:
    """HTTP/2 spoken from the first byte (``PRI * HTTP/2.0``) is served by hypercorn's h2:
    its first frame back is its SETTINGS."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await _serve_seam(nursery, _echo, Config(), print, parser)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                answer = await stream.receive_some()
            nursery.cancel_scope.cancel()
    assert answer[3] == 0x04, answer  # a frame's type is its fourth byte: 4 is SETTINGS
