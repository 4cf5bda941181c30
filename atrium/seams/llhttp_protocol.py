"""atrium's HTTP/1.1 protocol on httptools (llhttp), in place of hypercorn's ``H11Protocol``
and ``HTTPStream`` for plain HTTP/1.1 requests (``HTTP_PARSER=httptools``).

Why: h11 and hypercorn's stream layers cost a bare request about 110 us of the seam's
156 (docs/BENCHMARKS.md, "The HTTP floor, third pass"). This protocol parses with llhttp,
builds the ASGI scope as ``HTTPStream`` does, and writes responses as h11 frames them
(Content-Length, chunked or close-delimited; HEAD, 204 and 304 without a body; HTTP/1.0
closed after its response). It answers as h11 does (tests/test_seams_http1.py) except
where llhttp is stricter: a request with both Content-Length and Transfer-Encoding, two
equal Content-Lengths, an obs-fold line or bare LF line ends get 400 and a close. What it
writes itself (those refusals, 431, 501, a 404 for a Host outside ``server_names``, a 500
for an app that ended without a response) is a JSON error with a stable code
(``refusals.py``), where hypercorn writes an empty body.

A WebSocket (or h2c) upgrade, and HTTP/2 with prior knowledge (``PRI``), go to hypercorn's
path: the connection is handed, with the bytes read so far, to the ``fallback`` protocol.

Relies on (checked by tests/test_seams.py): ``httptools.HttpRequestParser(callbacks)``
with ``feed_data``, ``get_method``, ``get_http_version``, the callbacks ``on_message_begin``,
``on_url``, ``on_header``, ``on_headers_complete``, ``on_body``, ``on_message_complete``,
``on_chunk_header``; ``HttpParserUpgrade(offset)`` and ``HttpParserError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from enum import Enum, auto
from time import time
from typing import Any, Protocol, cast
from urllib.parse import unquote

import h11
import h11._headers
import httptools
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveEvent,
    ASGISendEvent,
    ConnectionState,
    Scope,
    TaskGroup,
    WorkerContext,
)
from hypercorn.utils import UnexpectedMessageError, build_and_validate_headers

from .refusals import refusal

_FIELD_NAME = h11._headers._field_name_re
_FIELD_VALUE = h11._headers._field_value_re
_VALID_HEADERS: set[tuple[bytes, bytes]] = set()
_VALID_HEADERS_MAX = 4096

# What a complete request head costs beyond its URL and header bytes, at the least
# ("GET  HTTP/1.1\r\n" and the blank line), and a chunk beyond its data ("0\r\n...\r\n").
_HEAD_OVERHEAD = 16
_CHUNK_OVERHEAD = 5


class Fallback(Protocol):
    """hypercorn's HTTP/1.1 protocol, as much of it as this one hands a connection to."""

    async def handle(self, event: Event) -> None: ...


class _Refused(Exception):
    """A request this protocol answers with ``status`` and a close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _State(Enum):
    REQUEST = auto()  # the app has not started its response
    RESPONSE = auto()  # the head is out or held; body messages follow
    DONE = auto()


class _Request:
    """One parsed request head, and whether its body has all arrived."""

    __slots__ = ("complete", "expect_continue", "headers", "keep_alive", "method", "target")

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.complete = False


class _Body:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _End:
    __slots__ = ()


class _Upgrade:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Error:
    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


_END = _End()
_Item = _Request | _Body | _End | _Upgrade | _Error


class _Exchange:
    """A request in flight and its response."""

    __slots__ = (
        "app_put",
        "chunked",
        "close_after",
        "closed",
        "head",
        "remaining",
        "request",
        "response",
        "scope",
        "start_time",
        "state",
        "suppress",
    )

    def __init__(self, request: _Request, scope: Scope) -> None:
        self.request = request
        self.scope = scope
        self.start_time = time()
        self.state = _State.REQUEST
        self.closed = False  # the app's messages are ignored from now on
        self.app_put: Callable[[ASGIReceiveEvent], Awaitable[None]] | None = None
        self.head = b""
        self.chunked = False
        self.remaining: int | None = None  # Content-Length left to write
        self.close_after = not request.keep_alive
        self.suppress = False
        self.response: dict[str, Any] | None = None


class LlhttpProtocol:
    """HTTP/1.1 over llhttp, for hypercorn's ``ProtocolWrapper`` (its ``H11Protocol``'s
    interface: ``initiate``, ``handle``)."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        task_group: TaskGroup,
        connection_state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
        fallback: Callable[[], Fallback],
        response_headers: Callable[[], list[tuple[bytes, bytes]]],
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.task_group = task_group
        self.connection_state = connection_state
        self.scheme = "https" if ssl else "http"
        self.client = client
        self.server = server
        self.send = send
        self.keep_alive_requests = 0
        self._make_fallback = fallback
        self._response_headers = response_headers
        self._fallback: Fallback | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._items: deque[_Item] = deque()
        self._exchange: _Exchange | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self._broken = False  # parsing ended (an error, or an upgrade under way)
        self._started = False
        # The request head being parsed.
        self._in_head = False
        self._head_bytes = 0
        self._consumed = 0  # bytes of this chunk that belong to earlier messages (estimated)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._transfer_encoding: list[bytes] = []
        self._current: _Request | None = None

    async def initiate(self) -> None:
        pass

    async def handle(self, event: Event) -> None:
        if self._fallback is not None:
            await self._fallback.handle(event)
        elif isinstance(event, RawData):
            if event.data and not self._broken and not self._closed:
                self._feed(event.data)
                await self._dispatch()
        elif isinstance(event, Closed):
            await self._on_closed()

    # The parser's side: bytes in, items queued.

    def _feed(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            if data.startswith(b"PRI * HTTP/2"):
                self._broken = True
                self._items.append(_Upgrade(data))
                return
        was_in_head = self._in_head
        self._consumed = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._broken = True
            self._items.append(_Upgrade(self._rebuilt_head() + data[upgrade.args[0] :]))
            return
        except httptools.HttpParserError as error:
            self._broken = True
            refused = error.__context__
            status = refused.status if isinstance(refused, _Refused) else 400
            if status == 400 and self._transfer_encoding and not _chunked(self._transfer_encoding):
                status = 501
            self._items.append(_Error(status))
            return
        if self._in_head:
            self._head_bytes += len(data) if was_in_head else max(len(data) - self._consumed, 0)
            if self._head_bytes > self.config.h11_max_incomplete_size:
                self._broken = True
                self._items.append(_Error(431))

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._transfer_encoding = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if name.lower() == b"transfer-encoding":
            self._transfer_encoding.append(value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._consumed += _HEAD_OVERHEAD + len(self._url)
        hosts = 0
        connection: list[bytes] = []
        expect = False
        headers = []
        raw = self.config.h11_pass_raw_headers
        for name, value in self._headers:
            self._consumed += len(name) + len(value) + 4
            lowered = name.lower()
            headers.append((name if raw else lowered, value))
            if lowered == b"host":
                hosts += 1
            elif lowered == b"connection":
                connection.extend(token.strip().lower() for token in value.split(b","))
            elif lowered == b"expect":
                expect = expect or b"100-continue" in value.lower()
        version = self._parser.get_http_version()
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Refused(400)
        if self._transfer_encoding and not _chunked(self._transfer_encoding):
            raise _Refused(501)
        if not self._url.isascii():
            raise _Refused(400)
        if self._parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade once the head is in: see _feed
        keep_alive = version == "1.1" and b"close" not in connection
        self._current = _Request(
            self._parser.get_method().decode("ascii").upper(),
            self._url,
            headers,
            keep_alive,
            expect and version == "1.1",
        )
        self._items.append(self._current)

    def on_body(self, body: bytes) -> None:
        self._consumed += len(body)
        self._items.append(_Body(body))

    def on_chunk_header(self) -> None:
        self._consumed += _CHUNK_OVERHEAD

    def on_message_complete(self) -> None:
        if self._current is None:  # an upgrade's: hypercorn's h11 reads it again
            return
        self._current.complete = True
        self._current = None
        self._items.append(_END)

    def _rebuilt_head(self) -> bytes:
        """The upgrade request's head, for hypercorn's h11 to read again."""
        method = self._parser.get_method()
        version = self._parser.get_http_version().encode()
        lines = [b"%s %s HTTP/%s\r\n" % (method, self._url, version)]
        lines += [b"%s: %s\r\n" % pair for pair in self._headers]
        return b"".join(lines) + b"\r\n"

    # The connection's side: items to the app, one request at a time.

    async def _dispatch(self) -> None:
        items = self._items
        while items and not self._closed:
            item = items[0]
            exchange = self._exchange
            if isinstance(item, _Request | _Upgrade) or (
                isinstance(item, _Error) and (exchange is None or exchange.request.complete)
            ):
                if exchange is not None:  # pipelined: hold it until the response is out
                    await self._idle.wait()
                    continue
            items.popleft()
            if isinstance(item, _Request):
                await self._start(item)
            elif isinstance(item, _Body):
                if exchange is not None and not exchange.closed and exchange.app_put:
                    await exchange.app_put(
                        {"type": "http.request", "body": item.data, "more_body": True}
                    )
            elif isinstance(item, _End):
                if exchange is not None and not exchange.closed and exchange.app_put:
                    await exchange.app_put(
                        {"type": "http.request", "body": b"", "more_body": False}
                    )
            elif isinstance(item, _Upgrade):
                items.clear()
                self._fallback = self._make_fallback()
                await self._fallback.handle(RawData(data=item.data))
            else:
                await self._refuse(item.status)

    async def _start(self, request: _Request) -> None:
        path, _, query_string = request.target.partition(b"?")
        scope: Scope = {
            "type": "http",
            "http_version": self._parser.get_http_version(),
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": request.method,
            "scheme": self.scheme,
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query_string,
            "root_path": self.config.root_path,
            "headers": request.headers,
            "client": self.client,
            "server": self.server,
            "state": self.connection_state.copy(),  # type: ignore[typeddict-item]
            "extensions": {},
        }
        exchange = _Exchange(request, scope)
        self._exchange = exchange
        self._idle = trio.Event()
        await self.send(Updated(idle=False))
        if self.config.server_names and not _host_in(request.headers, self.config.server_names):
            await self._write_error(exchange, 404)
            return
        exchange.app_put = await self.task_group.spawn_app(
            self.app, self.config, scope, lambda message: self._app_send(exchange, message)
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()
        if request.expect_continue and not request.complete and not self._items_hold_body():
            head = [b"HTTP/1.1 100 \r\n"]
            head += [b"%s: %s\r\n" % pair for pair in self._response_headers()]
            await self.send(RawData(data=b"".join(head) + b"\r\n"))

    def _items_hold_body(self) -> bool:
        return any(isinstance(item, _Body) for item in self._items)

    async def _refuse(self, status: int) -> None:
        """Answer a request llhttp (or a check here) refused, in atrium's JSON error shape
        (:func:`refusal`), and close."""
        exchange = self._exchange
        # With a request in flight, that one is the bad one (its body): answer it if its
        # app has not.
        if exchange is None or exchange.state is _State.REQUEST:
            await self.send(RawData(data=refusal(status, self._response_headers())))
        if exchange is not None:
            await self._end_exchange(exchange)
        await self.send(Closed())

    async def _write_error(self, exchange: _Exchange, status: int) -> None:
        await self.send(RawData(data=refusal(status, self._response_headers())))
        exchange.state = _State.DONE
        await self._access(exchange, {"status": status, "headers": []})
        await self._end_exchange(exchange)
        await self.send(Closed())

    async def _app_send(self, exchange: _Exchange, event: ASGISendEvent | None) -> None:
        if exchange.closed:
            return
        message = cast("dict[str, Any] | None", event)
        if message is None:  # the app has returned
            if exchange.state is _State.REQUEST:
                await self._write_error(exchange, 500)
            elif exchange.state is _State.RESPONSE:  # its body is not whole: close
                await self._end_exchange(exchange)
                await self.send(Closed())
            return
        kind = message["type"]
        if kind == "http.response.start" and exchange.state is _State.REQUEST:
            status = int(message["status"])
            headers = build_and_validate_headers(message.get("headers", []))
            exchange.head = self._response_head(exchange, status, headers)
            exchange.response = dict(message)
            exchange.state = _State.RESPONSE
        elif kind == "http.response.body" and exchange.state is _State.RESPONSE:
            body = bytes(message.get("body", b""))
            more = message.get("more_body", False)
            data, exchange.head = exchange.head, b""
            if body and not exchange.suppress:
                data += self._framed(exchange, body)
            if not more:
                if exchange.chunked:
                    data += b"0\r\n\r\n"
                elif exchange.remaining:
                    exchange.state = _State.DONE
                    await self._end_exchange(exchange)
                    await self.send(RawData(data=data))
                    await self.send(Closed())
                    raise h11.LocalProtocolError("Too little data for declared Content-Length")
            if data:
                await self.send(RawData(data=data))
            if not more:
                await self._finish(exchange)
        else:
            raise UnexpectedMessageError(exchange.state, kind)

    def _framed(self, exchange: _Exchange, body: bytes) -> bytes:
        if exchange.chunked:
            return b"%x\r\n%s\r\n" % (len(body), body)
        if exchange.remaining is not None:
            if len(body) > exchange.remaining:
                exchange.close_after = True
                raise h11.LocalProtocolError("Too much data for declared Content-Length")
            exchange.remaining -= len(body)
        return body

    def _response_head(
        self, exchange: _Exchange, status: int, headers: list[tuple[bytes, bytes]]
    ) -> bytes:
        """The response's head as h11 writes it (its framing headers and Connection)."""
        if not 200 <= status < 1000:
            raise h11.LocalProtocolError("Response status_code should be in range [200, 999]")
        headers.extend(self._response_headers())
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            headers.append((b"connection", b"close"))
        check_headers(headers)
        request = exchange.request
        exchange.suppress = request.method == "HEAD" or status in (204, 304)
        length: int | None = None
        chunked = False
        connection: list[bytes] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = True
            elif lowered == b"connection":
                connection.extend(token.strip().lower() for token in value.split(b","))
        need_close = False
        if status not in (204, 304) and (chunked or length is None):
            headers = [pair for pair in headers if pair[0].lower() != b"content-length"]
            headers = [pair for pair in headers if pair[0].lower() != b"transfer-encoding"]
            if self._parser.get_http_version() != "1.1":
                need_close = request.method != "HEAD"
            else:
                headers.append((b"Transfer-Encoding", b"chunked"))
                exchange.chunked = True
            length = None
        if not request.keep_alive or need_close:
            tokens = {token for token in connection if token and token != b"keep-alive"}
            tokens.add(b"close")
            headers = [pair for pair in headers if pair[0].lower() != b"connection"]
            headers.append((b"Connection", b", ".join(sorted(tokens))))
            exchange.close_after = True
        if b"close" in connection:
            exchange.close_after = True
        if exchange.suppress:
            exchange.chunked = False
        else:
            exchange.remaining = length
            if length is None and not exchange.chunked:
                exchange.close_after = True  # close-delimited
        lines = [b"HTTP/1.1 %d \r\n" % status]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        return b"".join(lines) + b"\r\n"

    async def _finish(self, exchange: _Exchange) -> None:
        """The response is out: the next request may start, or the connection closes."""
        exchange.state = _State.DONE
        await self._access(exchange, exchange.response)
        await self._end_exchange(exchange)
        if self._closed:
            return
        if (
            exchange.close_after
            or not exchange.request.complete
            or self.context.terminated.is_set()
        ):
            await self.send(Closed())
            return
        await self.send(Updated(idle=True))

    async def _end_exchange(self, exchange: _Exchange) -> None:
        """Tell the app its request is over (as ``HTTPStream`` does), and free the
        connection for the next one."""
        if exchange.closed:
            return
        exchange.closed = True
        if self._exchange is exchange:
            self._exchange = None
            self._idle.set()
        if exchange.app_put is not None:
            await exchange.app_put({"type": "http.disconnect"})

    async def _access(self, exchange: _Exchange, response: dict[str, Any] | None) -> None:
        if self.config.accesslog is not None:
            await self.config.log.access(
                exchange.scope,  # type: ignore[arg-type]
                response,  # type: ignore[arg-type]
                time() - exchange.start_time,
            )

    async def _on_closed(self) -> None:
        self._closed = True
        exchange = self._exchange
        self._idle.set()
        if exchange is not None and not exchange.closed:
            if exchange.state is not _State.DONE:
                await self._access(exchange, None)
            await self._end_exchange(exchange)


def _chunked(values: list[bytes]) -> bool:
    """Transfer-Encoding is exactly ``chunked``: h11 answers 501 to anything else."""
    tokens = [token.strip().lower() for value in values for token in value.split(b",")]
    return tokens == [b"chunked"]


def _host_in(headers: list[tuple[bytes, bytes]], server_names: list[str]) -> bool:
    for name, value in headers:
        if name.lower() == b"host":
            return value.decode() in server_names
    return "" in server_names


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Each response header pair checked with h11's own expressions, once per distinct
    pair rather than for every response (h11 runs two regular expressions over every
    header of every response: a fifth of what a response costs it). Raises h11's
    ``LocalProtocolError`` for an illegal name or value, as h11 does."""
    valid = _VALID_HEADERS
    for pair in headers:
        if pair not in valid:
            name, value = pair
            if _FIELD_NAME.fullmatch(name) is None:
                raise h11.LocalProtocolError(f"Illegal header name {name!r}")
            if _FIELD_VALUE.fullmatch(value) is None:
                raise h11.LocalProtocolError(f"Illegal header value {value!r}")
            if len(valid) >= _VALID_HEADERS_MAX:
                valid.clear()
            valid.add(pair)
