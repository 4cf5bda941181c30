"""Log lines an operator can correlate and trust: context fields, JSON or text, no secrets.

A unit of work (an HTTP request, a WebSocket connection, a job attempt) opens its context
at its boundary with ``log_context(...)``; every task it spawns inherits it (trio copies
contextvars at spawn), and a field learned later (``bind(user_id=...)`` once the token is
verified) reaches all of them, as the context is one shared object per unit.
``ContextFilter`` copies the fields onto each record; ``RedactFilter`` is the safety net
that keeps anything shaped like a JWT or a ``Bearer`` credential out of every line (the
code never logs headers or bodies in the first place). ``configure_logging`` installs
both, with ``JsonFormatter`` (one orjson object a line) or ``TextFormatter``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Literal

import orjson

LogFormat = Literal["json", "text"]

# A JWT (three base64url parts, the first a JSON object: "eyJ") or a Bearer credential.
_SECRET = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){1,2}|(?i:bearer)\s+\S+")
REDACTED = "[redacted]"
# Attributes every LogRecord has; the rest are context fields or ``extra=`` fields.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class LogContext:
    """The fields of one unit of work, shared by the tasks it spawns."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def set(self, **fields: object) -> None:
        """Add or replace fields (None values are left out)."""
        self.fields.update({k: v for k, v in fields.items() if v is not None})


_context: ContextVar[LogContext | None] = ContextVar("atrium_log_context", default=None)


def log_context(**fields: object) -> AbstractContextManager[LogContext]:
    """Open a unit's context for the duration of the block: the enclosing context's
    fields plus ``fields``; lines logged in the block (and in tasks spawned from it) carry
    them."""
    parent = _context.get()
    context = LogContext({} if parent is None else dict(parent.fields))
    context.set(**fields)
    return _Opened(context)


class _Opened:
    """``log_context``'s block: a plain class, as every HTTP request opens one (a
    generator-based context manager costs several times as much)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: LogContext) -> None:
        self._context = context

    def __enter__(self) -> LogContext:
        self._token = _context.set(self._context)
        return self._context

    def __exit__(self, *exc_info: object) -> None:
        _context.reset(self._token)


@contextmanager
def detached() -> Iterator[None]:
    """Leave the current unit's context for the block: a long-lived task spawned there (a
    supervisor's child) must not carry the ids of the request that happened to start it."""
    token = _context.set(None)
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: object) -> None:
    """Add fields to the current unit's context (no-op outside one)."""
    context = _context.get()
    if context is not None:
        context.set(**fields)


def redact(text: str) -> str:
    """``text`` with anything shaped like a JWT or a Bearer credential replaced."""
    if "eyJ" not in text and "earer" not in text and "EARER" not in text:
        return text  # the common case, without running the pattern
    return _SECRET.sub(REDACTED, text)


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's context and ``extra=`` fields."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class ContextFilter(logging.Filter):
    """Copies the current unit's context fields onto each record (``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        if context is not None:
            for key, value in context.fields.items():
                record.__dict__.setdefault(key, value)
        return True


class RedactFilter(logging.Filter):
    """Replaces JWT-shaped strings and Bearer credentials in the message, the string
    fields and the traceback of each record."""

    _traceback = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it (handleError)
            return True
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        for key, value in extra_fields(record).items():
            if isinstance(value, str):
                record.__dict__[key] = redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the context and extra
    fields, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` (the context and extra fields)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={v}" for k, v in fields.items())


def make_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (default stderr) in ``log_format``, with the
    context and redaction filters."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every logger's lines to stderr in ``log_format`` at ``level`` and above."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(make_handler(log_format))
    root.setLevel(level)
